"""NIH ChestX-ray14 labels, task filters, patient-wise splits and a cached torch Dataset.

The label file is NIH's ``Data_Entry_2017.csv``: either the 2017 Kaggle copy (with a trailing
empty column) or the 2020 revision (``Data_Entry_2017_v2020.csv``); both have the columns
``Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender,
View Position, ...`` and pipe-separated ``Finding Labels``.

Two tasks (``triage_core.spec.TASKS``):

* ``multiclass``: the seed study's protocol; only images whose labels contain exactly one of the
  target classes are kept; the target is that class's index (softmax over the classes).
* ``multilabel``: every image is kept; the target is a 0/1 vector over the classes, so images
  with none of them ("No Finding" and other findings) are negatives for all (one sigmoid each).

Patient-wise splits live in :mod:`training.splits`.

Images are decoded and preprocessed once through ``triage_core.imaging`` (``load_image`` then
``to_tensor``) and cached in memory; training-time augmentation works on the cached tensors.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from triage_core.errors import TriageError
from triage_core.spec import CLASS_NAMES, TASKS

if TYPE_CHECKING:
    import torch

    from triage_core.spec import ModelSpec

logger = logging.getLogger(__name__)

#: Columns every NIH label file must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("Image Index", "Finding Labels", "Patient ID")
#: File name suffixes treated as images when indexing an image folder.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
_OFFICIAL_FOLDER = re.compile(r"^images(_\d+)?$")


class DatasetError(TriageError):
    """The label file, image folder or split definition cannot be used."""


@dataclass(frozen=True, slots=True)
class LabelRecord:
    """One row of the NIH label file.

    Attributes
    ----------
    image_index : str
        File name of the image (``00000001_000.png``).
    labels : tuple of str
        The ``Finding Labels`` split on ``|`` (``("No Finding",)`` for normal images).
    patient_id : str
        NIH patient identifier (as written, leading zeros stripped).
    follow_up : int
        ``Follow-up #``; -1 when absent.
    age : int or None
        Patient age in years (``58`` or the older ``058Y`` style); ``None`` when unparsable.
    sex : str
        ``Patient Gender`` as written.
    view : str
        ``View Position`` (``PA``/``AP``).
    """

    image_index: str
    labels: tuple[str, ...]
    patient_id: str
    follow_up: int = -1
    age: int | None = None
    sex: str = ""
    view: str = ""


def _parse_int(text: str) -> int | None:
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else None


def read_labels(path: str | Path) -> list[LabelRecord]:
    """Parse an NIH ``Data_Entry_2017.csv`` (2017 or 2020 revision).

    Parameters
    ----------
    path : str or Path
        The CSV file.

    Returns
    -------
    list of LabelRecord
        In file order; duplicate ``Image Index`` rows are refused.

    Raises
    ------
    DatasetError
        Missing file, missing columns, an empty file or a malformed/duplicate row
        (the message names the file and the line).
    """
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"label file {path}: {exc.strerror or exc}") from exc
    records: list[LabelRecord] = []
    seen: set[str] = set()
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"label file {path} is empty") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"label file {path}: not a CSV file ({exc})") from exc
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DatasetError(
                f"label file {path} lacks column(s) {missing}; expected the NIH "
                f"Data_Entry_2017.csv header with {list(REQUIRED_COLUMNS)}"
            )
        col = {name: header.index(name) for name in header if name}
        i_img, i_lab, i_pid = (col[c] for c in REQUIRED_COLUMNS)
        i_fu = col.get("Follow-up #")
        i_age = col.get("Patient Age")
        i_sex = col.get("Patient Gender")
        i_view = col.get("View Position")
        need = max(i_img, i_lab, i_pid) + 1
        try:
            for line_no, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) < need:
                    raise DatasetError(
                        f"label file {path}, line {line_no}: {len(row)} fields, "
                        f"expected at least {need}"
                    )
                name = row[i_img].strip()
                if not name:
                    raise DatasetError(f"label file {path}, line {line_no}: empty Image Index")
                if name in seen:
                    raise DatasetError(
                        f"label file {path}, line {line_no}: duplicate Image Index {name}"
                    )
                seen.add(name)
                labels = tuple(s.strip() for s in row[i_lab].split("|") if s.strip())
                pid = row[i_pid].strip().lstrip("0") or "0"
                follow_up = -1
                if i_fu is not None and i_fu < len(row):
                    parsed = _parse_int(row[i_fu])
                    follow_up = -1 if parsed is None else parsed
                records.append(
                    LabelRecord(
                        image_index=name,
                        labels=labels,
                        patient_id=pid,
                        follow_up=follow_up,
                        age=_parse_int(row[i_age])
                        if i_age is not None and i_age < len(row)
                        else None,
                        sex=row[i_sex].strip() if i_sex is not None and i_sex < len(row) else "",
                        view=row[i_view].strip()
                        if i_view is not None and i_view < len(row)
                        else "",
                    )
                )
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"label file {path}: malformed CSV ({exc})") from exc
    if not records:
        raise DatasetError(f"label file {path} has a header but no rows")
    logger.info("read %d label rows from %s", len(records), path)
    return records


def index_images(root: str | Path) -> dict[str, Path]:
    """Map image file name -> path for the images under ``root``.

    Looks at files directly in ``root`` (a flat folder) and in the official NIH layout
    ``root/images_001/images/*.png`` ... (and ``root/images/``). The first path found for a
    name wins; duplicates are logged.

    Raises
    ------
    DatasetError
        ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder")
    found: dict[str, Path] = {}
    duplicates = 0
    folders = [root]
    with os.scandir(root) as entries:
        subdirs = sorted(e.name for e in entries if e.is_dir() and _OFFICIAL_FOLDER.match(e.name))
    for sub in subdirs:
        inner = root / sub / "images"
        folders.append(inner if inner.is_dir() else root / sub)
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if not entry.name.lower().endswith(IMAGE_SUFFIXES) or not entry.is_file():
                    continue
                if entry.name in found:
                    duplicates += 1
                    continue
                found[entry.name] = Path(entry.path)
    if duplicates:
        logger.warning(
            "%d duplicate image names under %s; the first copy is used", duplicates, root
        )
    logger.info("indexed %d images under %s", len(found), root)
    return found


def attach_images(
    records: Sequence[LabelRecord], images: Mapping[str, Path]
) -> tuple[list[LabelRecord], list[Path]]:
    """Keep the records whose image exists; returns them and their paths (same order).

    Raises
    ------
    DatasetError
        None of the records has an image.
    """
    kept: list[LabelRecord] = []
    paths: list[Path] = []
    for record in records:
        path = images.get(record.image_index)
        if path is not None:
            kept.append(record)
            paths.append(path)
    if not kept:
        raise DatasetError(
            f"none of the {len(records)} labelled images was found among {len(images)} image "
            "files: check --images and --labels"
        )
    if len(kept) < len(records):
        logger.info("%d of %d labelled images found", len(kept), len(records))
    return kept, paths


@dataclass(frozen=True)
class TaskData:
    """Records of one task with their targets.

    ``targets`` is ``int64 (N,)`` class indices for ``multiclass`` and ``float32 (N, C)``
    0/1 vectors for ``multilabel``.
    """

    task: str
    class_names: tuple[str, ...]
    records: tuple[LabelRecord, ...]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.records)

    def multi_hot(self) -> np.ndarray:
        """Targets as a ``(N, C)`` 0/1 matrix for either task."""
        if self.task == "multilabel":
            return self.targets
        out = np.zeros((len(self.records), len(self.class_names)), dtype=np.float32)
        out[np.arange(len(self.records)), self.targets] = 1.0
        return out

    def class_counts(self) -> dict[str, int]:
        """Positives per class (a multi-label image counts in every class it carries)."""
        counts = self.multi_hot().sum(axis=0).astype(int)
        out = {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}
        if self.task == "multilabel":
            out["none"] = int((self.multi_hot().sum(axis=1) == 0).sum())
        return out

    def subset(self, indices: Sequence[int] | np.ndarray) -> TaskData:
        idx = np.asarray(indices, dtype=np.int64)
        return TaskData(
            self.task,
            self.class_names,
            tuple(self.records[i] for i in idx),
            self.targets[idx],
        )


def select_task(
    records: Iterable[LabelRecord], task: str, class_names: Sequence[str] = CLASS_NAMES
) -> TaskData:
    """Apply a task's filter and build its targets (see the module docstring).

    Raises
    ------
    DatasetError
        Unknown task, or no record left after the filter.
    """
    if task not in TASKS:
        raise DatasetError(f"unknown task {task!r}; expected one of {TASKS}")
    names = tuple(class_names)
    position = {name: i for i, name in enumerate(names)}
    kept: list[LabelRecord] = []
    hits_per_record: list[list[int]] = []
    for record in records:
        hits = sorted({position[label] for label in record.labels if label in position})
        if task == "multiclass" and len(hits) != 1:
            continue
        hits_per_record.append(hits)
        kept.append(record)
    if not kept:
        raise DatasetError(f"no image left for task {task!r} (classes {list(names)})")
    if task == "multiclass":
        targets = np.asarray([h[0] for h in hits_per_record], dtype=np.int64)
    else:
        targets = np.zeros((len(kept), len(names)), dtype=np.float32)
        rows = [i for i, h in enumerate(hits_per_record) for _ in h]
        cols = [c for h in hits_per_record for c in h]
        targets[rows, cols] = 1.0
    return TaskData(task, names, tuple(kept), targets)


# --------------------------------------------------------------------------------------------
# Cached tensors and augmentation


@dataclass(frozen=True)
class Augment:
    """Train-time augmentation parameters (applied on the cached, letterboxed tensor).

    Small affine (rotation, scale, translation), brightness and contrast; horizontal flip only
    when asked (a chest X-ray is not left-right symmetric). ``crop`` adds a random square crop
    whose side is a uniform fraction of the image in ``crop`` (at a uniform position), resized
    back to the full size: ``(0.875, 1.0)`` is the "196-224 px crop of a 224 px image" recipe.
    """

    degrees: float = 7.0
    scale: tuple[float, float] = (0.92, 1.08)
    translate: float = 0.04
    brightness: float = 0.1
    contrast: float = 0.15
    hflip: bool = False
    crop: tuple[float, float] | None = None

    @classmethod
    def crop_only(cls, crop: tuple[float, float] = (0.875, 1.0), hflip: bool = False) -> Augment:
        """Only the random resized crop (no rotation, scaling or intensity change)."""
        return cls(
            degrees=0.0,
            scale=(1.0, 1.0),
            translate=0.0,
            brightness=0.0,
            contrast=0.0,
            hflip=hflip,
            crop=crop,
        )


def load_tensors(
    paths: Sequence[Path],
    spec: ModelSpec,
    *,
    progress: bool = False,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> torch.Tensor:
    """Decode and preprocess images once: ``(N, 3, S, S)`` float16, spec-normalised.

    Uses :func:`triage_core.imaging.load_image` and :func:`triage_core.imaging.to_tensor`,
    exactly the service's preprocessing; ``transform`` (e.g. :func:`degrade_resolution`) is
    applied to the decoded [0, 1] image first.
    """
    import torch

    from triage_core.imaging import load_image, to_tensor

    size = spec.input_size
    out = torch.empty((len(paths), 3, size, size), dtype=torch.float16)
    iterator: Iterable[tuple[int, Path]] = enumerate(paths)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(paths), desc=f"decode {size}px", unit="img")
    for i, path in iterator:
        image = load_image(path)
        if transform is not None:
            image = transform(image)
        out[i] = to_tensor(image, spec).to(torch.float16)
    return out


#: Side of the low-resolution NIH copies (``cxr14/lowres64``) that :func:`degrade_resolution`
#: imitates.
LOWRES_SIDE = 64


def degrade_resolution(image: np.ndarray, side: int = LOWRES_SIDE) -> np.ndarray:
    """``image`` ([0, 1], ``H x W``) reduced so that its long side is ``side`` px (Lanczos,
    8-bit: how the low-resolution copies were stored) and enlarged back to ``H x W`` (bilinear),
    so that a model cannot tell a high-resolution training image from a 64 px one by its
    sharpness alone."""
    from triage_core.imaging import export_resize
    from triage_core.resample import resize_antialiased

    height, width = image.shape
    scale = side / max(height, width)
    small = export_resize(image, max(1, round(height * scale)), max(1, round(width * scale)))
    return np.clip(resize_antialiased(small, height, width), 0.0, 1.0)


def degraded_choice(n: int, share: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(share * n)`` of ``n`` images, drawn with ``seed`` (the images
    that :func:`degrade_resolution` turns into low-resolution look-alikes for training)."""
    if not 0.0 <= share <= 1.0:
        raise DatasetError(f"the degraded share must be in [0, 1], got {share}")
    count = int(round(share * n))
    rng = np.random.default_rng([seed, 64])
    return np.sort(rng.permutation(n)[:count]).astype(np.int64)


def with_degraded(
    tensors: torch.Tensor, rows: np.ndarray, degraded: np.ndarray, low: torch.Tensor | None
) -> torch.Tensor:
    """The training tensors of ``rows``: copies of ``tensors[rows]`` in which every row that is
    among the sorted ``degraded`` indices is replaced by its low-resolution tensor (``low``, one
    per degraded index, in that order)."""
    import torch

    out = tensors[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
    if low is None or len(degraded) == 0:
        return out
    rows = np.asarray(rows, dtype=np.int64)
    at = np.minimum(np.searchsorted(degraded, rows), len(degraded) - 1)
    hit = degraded[at] == rows
    out[torch.from_numpy(np.flatnonzero(hit))] = low[torch.from_numpy(at[hit])]
    return out


class CachedImageDataset:
    """A map-style torch Dataset over cached tensors, with optional seeded augmentation.

    Parameters
    ----------
    images : torch.Tensor
        ``(N, 3, S, S)`` spec-normalised tensors (see :func:`load_tensors`).
    targets : numpy.ndarray
        Task targets (see :class:`TaskData`).
    spec : ModelSpec
        For the normalisation (augmentation works in [0, 1] intensity).
    augment : Augment, optional
        Train-time augmentation; ``None`` for evaluation.
    seed : int
        Augmentation is a function of ``(seed, epoch, index)`` only, so it is identical whatever
        the number of DataLoader workers or processes. Call :meth:`set_epoch` every epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: np.ndarray,
        spec: ModelSpec,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        import torch

        if len(images) != len(targets):
            raise DatasetError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = torch.as_tensor(targets)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        x = self.images[index].to(torch.float32)
        if self.augment is not None:
            x = self._augment(x, index)
        return x, self.targets[index]

    def _augment(self, x: torch.Tensor, index: int) -> torch.Tensor:
        import math

        import torch
        import torch.nn.functional as F

        aug = self.augment
        assert aug is not None
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch * 7_919 + int(index)) % (2**63 - 1)
        )
        u = torch.rand(10, generator=gen).tolist()  # the first 7 draws as before crop existed
        angle = math.radians((2 * u[0] - 1) * aug.degrees)
        scale = aug.scale[0] + u[1] * (aug.scale[1] - aug.scale[0])
        tx = (2 * u[2] - 1) * aug.translate * 2  # affine_grid units: the image spans [-1, 1]
        ty = (2 * u[3] - 1) * aug.translate * 2
        if aug.crop is not None:  # a window of side `side` (fraction), resized to the full size
            side = aug.crop[0] + u[7] * (aug.crop[1] - aug.crop[0])
            scale /= side
            tx += (2 * u[8] - 1) * (1 - side)
            ty += (2 * u[9] - 1) * (1 - side)
        flip = -1.0 if (aug.hflip and u[4] < 0.5) else 1.0
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos * flip, -sin, tx], [sin * flip, cos, ty]], dtype=torch.float32)
        raw = x * self._std + self._mean  # back to [0, 1] intensity
        grid = F.affine_grid(theta[None], [1, *raw.shape], align_corners=False)
        raw = F.grid_sample(
            raw[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[0]
        contrast = 1 + (2 * u[5] - 1) * aug.contrast
        brightness = (2 * u[6] - 1) * aug.brightness
        centre = raw.mean()
        raw = ((raw - centre) * contrast + centre + brightness).clamp_(0.0, 1.0)
        return (raw - self._mean) / self._std
