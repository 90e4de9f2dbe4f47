"""Patient-wise train / validation / test splits of NIH ChestX-ray14 data.

Either 60/20/20 from a seed (patients shuffled, whole patients taken in turn) or NIH's official
``train_val_list.txt`` / ``test_list.txt`` (validation then drawn patient-wise from train_val).
A split is identified by a fingerprint of its image names. Training itself is judged by
patient-wise cross-validation (:mod:`training.cv`); these splits remain for reading the
checkpoints of the former single-split training (their recorded split is rebuilt and checked
against its fingerprint) and for the data tests. :func:`load_task_data` is the loader of
every path.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data import (
    DatasetError,
    LabelRecord,
    TaskData,
    attach_images,
    index_images,
    read_labels,
    select_task,
)

logger = logging.getLogger(__name__)

#: Default split fractions (train, validation, test).
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)
SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """How a train / validation / test split is drawn: official lists, or seeded fractions.

    Recorded in checkpoints made by the former single-split training (``spec.training["data"]
    ["split"]``), so that :func:`training.evaluate.rebuild_split` can rebuild their split.
    """

    data_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    train_val_list: Path | None = None
    test_list: Path | None = None


@dataclass(frozen=True)
class Split:
    """Indices into a :class:`TaskData` for train, validation and test."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    method: str = "seeded"
    seed: int = 0
    info: Mapping[str, Any] = field(default_factory=dict)

    def parts(self) -> dict[str, np.ndarray]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def sizes(self) -> dict[str, int]:
        return {name: int(len(idx)) for name, idx in self.parts().items()}


def _group_by_patient(
    records: Sequence[LabelRecord], indices: Iterable[int]
) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(records[i].patient_id, []).append(int(i))
    return groups


def _assign_patients(
    records: Sequence[LabelRecord],
    indices: Sequence[int],
    fractions: Sequence[float],
    seed: int,
) -> list[np.ndarray]:
    """Shuffle patients with ``seed`` and fill the parts in order up to their image quota."""
    groups = _group_by_patient(records, indices)
    patients = sorted(groups)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    total = sum(len(v) for v in groups.values())
    bounds = np.cumsum(fractions) / float(sum(fractions)) * total
    parts: list[list[int]] = [[] for _ in fractions]
    filled = 0
    part = 0
    for k in order:
        while part < len(fractions) - 1 and filled >= bounds[part] - 1e-9:
            part += 1
        members = groups[patients[k]]
        parts[part].extend(members)
        filled += len(members)
    return [np.asarray(sorted(p), dtype=np.int64) for p in parts]


def patient_split(
    data: TaskData,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Split:
    """Patient-wise split of ``data`` into train/val/test (default 60/20/20) from ``seed``.

    Patients are shuffled with ``numpy.random.default_rng(seed)`` and whole patients are put
    into train until it holds its share of the images, then validation, then test, so no patient
    is in two splits and the result depends only on the records and the seed.

    Raises
    ------
    DatasetError
        Bad fractions, or too few patients for three non-empty splits.
    """
    if len(fractions) != 3 or min(fractions) <= 0:
        raise DatasetError(f"split fractions must be three positive numbers, got {fractions}")
    n_patients = len({r.patient_id for r in data.records})
    if n_patients < 3:
        raise DatasetError(f"a patient-wise split needs at least 3 patients, got {n_patients}")
    train, val, test = _assign_patients(data.records, range(len(data)), fractions, seed)
    if not len(val) or not len(test):
        raise DatasetError(f"split of {len(data)} images left an empty validation or test set")
    return Split(
        train,
        val,
        test,
        method="seeded",
        seed=seed,
        info={"fractions": [float(f) for f in fractions]},
    )


def read_name_list(path: str | Path) -> set[str]:
    """Read an official list file (one image name per line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"split list {path}: {exc}") from exc
    names = {line.strip() for line in text.splitlines() if line.strip()}
    if not names:
        raise DatasetError(f"split list {path} is empty")
    return names


def official_split(
    data: TaskData,
    train_val_list: str | Path,
    test_list: str | Path,
    seed: int = 0,
    val_fraction: float = 0.2,
) -> Split:
    """Split by NIH's ``train_val_list.txt`` / ``test_list.txt``.

    Test is every image named in ``test_list``; validation is ``val_fraction`` of the
    train_val images, drawn patient-wise with ``seed``; images in neither list are left out.

    Raises
    ------
    DatasetError
        A patient is in both lists, or a part would be empty.
    """
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    trainval_names = read_name_list(train_val_list)
    test_names = read_name_list(test_list)
    both = trainval_names & test_names
    if both:
        raise DatasetError(f"{len(both)} images are in both split lists, e.g. {sorted(both)[0]}")
    tv_idx = [i for i, r in enumerate(data.records) if r.image_index in trainval_names]
    test_idx = [i for i, r in enumerate(data.records) if r.image_index in test_names]
    shared = {data.records[i].patient_id for i in tv_idx} & {
        data.records[i].patient_id for i in test_idx
    }
    if shared:
        raise DatasetError(
            f"{len(shared)} patients have images in both train_val and test lists, "
            f"e.g. patient {sorted(shared)[0]}"
        )
    if not tv_idx or not test_idx:
        raise DatasetError(
            f"the split lists match {len(tv_idx)} train_val and {len(test_idx)} test images "
            "of this data"
        )
    train, val = _assign_patients(data.records, tv_idx, (1 - val_fraction, val_fraction), seed)
    if not len(val) or not len(train):
        raise DatasetError("too few train_val patients for a validation split")
    left_out = len(data) - len(tv_idx) - len(test_idx)
    return Split(
        train,
        val,
        np.asarray(sorted(test_idx), dtype=np.int64),
        method="official",
        seed=seed,
        info={"val_fraction": val_fraction, "left_out": left_out},
    )


def split_summary(data: TaskData, split: Split) -> dict[str, dict[str, int]]:
    """Images, patients and class counts per split."""
    out: dict[str, dict[str, int]] = {}
    for name, idx in split.parts().items():
        part = data.subset(idx)
        row = {"images": len(part), "patients": len({r.patient_id for r in part.records})}
        row.update(part.class_counts())
        out[name] = row
    return out


def format_split_summary(summary: Mapping[str, Mapping[str, int]]) -> str:
    """A small fixed-width table of :func:`split_summary` (printed by ``triage train``).

    Rows in train/val/test order, columns images and patients first, then the classes.
    """
    columns: list[str] = ["images", "patients"]
    for row in summary.values():
        for key in row:
            if key not in columns and key != "none":
                columns.append(key)
    if any("none" in row for row in summary.values()):
        columns.append("none")
    names = [n for n in SPLIT_NAMES if n in summary] + [n for n in summary if n not in SPLIT_NAMES]
    widths = [max(len(c), 6) for c in columns]
    lines = ["split  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    for name in names:
        row = summary[name]
        cells = [str(row.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)]
        lines.append(f"{name:<5}  " + "  ".join(cells))
    return "\n".join(lines)


def check_patient_disjoint(data: TaskData, split: Split) -> None:
    """Raise :class:`DatasetError` if any patient appears in two splits."""
    owners: dict[str, str] = {}
    for name, idx in split.parts().items():
        for i in idx:
            pid = data.records[int(i)].patient_id
            if owners.setdefault(pid, name) != name:
                raise DatasetError(f"patient {pid} is in both {owners[pid]} and {name}")


def split_fingerprint(data: TaskData, split: Split) -> str:
    """Short hash of the image names per split (recorded in checkpoints to identify a split)."""
    digest = hashlib.sha256()
    for name, idx in split.parts().items():
        digest.update(name.encode())
        for i in idx:
            digest.update(data.records[int(i)].image_index.encode() + b"\n")
    return digest.hexdigest()[:16]


def make_split(data: TaskData, config: SplitConfig) -> Split:
    """The configured split (official lists or seeded 60/20/20), checked patient-disjoint."""
    if config.train_val_list is not None and config.test_list is not None:
        split = official_split(data, config.train_val_list, config.test_list, seed=config.data_seed)
    else:
        split = patient_split(data, seed=config.data_seed, fractions=config.split_fractions)
    check_patient_disjoint(data, split)
    return split


def load_task_data(
    images: Path, labels: Path, task: str, max_images: int | None = None, seed: int = 0
) -> tuple[TaskData, dict[str, Path]]:
    """Labels joined with the images present, filtered to ``task``.

    ``max_images`` (for smoke runs) keeps a seeded random subset of whole patients.
    """
    records = read_labels(labels)
    index = index_images(images)
    kept, _ = attach_images(records, index)
    data = select_task(kept, task)
    if max_images is not None and max_images < len(data):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(data))
        data = data.subset(np.sort(order[:max_images]))
    return data, index
