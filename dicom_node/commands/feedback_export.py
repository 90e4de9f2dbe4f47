"""``triage feedback export``: readers' final verdicts as a training set, without PHI.

The studies written are those whose every scored finding has a decided final verdict
(:meth:`triage_core.worklist.feedback.Feedback.export_studies`); each eligible image of such a
study becomes one row. ``DIR`` receives:

``labels.csv``
    NIH ``Data_Entry_2017`` columns, the header exactly as in the 2020 revision
    (``Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View
    Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]``; the two bracketed
    names span two fields each, as in NIH's file). ``Finding Labels``: the findings judged
    present, ``|``-separated, or ``No Finding``. ``Patient ID``: the installation's salted hash
    of the DICOM Patient ID (:func:`triage_core.uids.hash_identifier`, the tag the node's log
    lines show; the study's hash when the Patient ID is empty), never the ID. ``Image Index``:
    ``<patient key>_<follow-up, 3 digits>.png``, as NIH names its files. ``Patient Age`` in
    years from Patient's Age (``090`` and above written as 90), ``Patient Gender`` M/F/O,
    ``View Position`` PA/AP, the original size and pixel spacing. Readable by
    ``training.data.read_labels``.
``images/``
    One 8-bit grayscale PNG per row, ``IMAGE_SIZE`` pixels square (default
    :data:`~triage_core.imaging.EXPORT_SIZE`, the size of the shared NIH PNGs): the DICOM goes
    through the serving path, :func:`triage_core.imaging.load_image` then
    :func:`triage_core.imaging.to_tensor` (with mean 0 and std 1, so the tensor is the
    letterboxed image in [0, 1]), then rounded to 8 bits. No text chunk, no DICOM header.
``provenance.csv``
    ``Image Index,Study Hash,Model,Model Version,Readers,Findings Judged``: the study's salted
    hash, the model whose scores the readers saw, how many readers gave verdicts, how many
    findings have a decided final verdict.

Nothing else leaves: no name, no ID, no UID, no date (not even the year), no note, no DICOM
element. Log lines name studies by their hash only.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from triage_core.uids import hash_identifier

if TYPE_CHECKING:
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

#: The NIH Data_Entry_2017 header, field by field.
LABEL_HEADER: tuple[str, ...] = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
PROVENANCE_HEADER: tuple[str, ...] = (
    "Image Index",
    "Study Hash",
    "Model",
    "Model Version",
    "Readers",
    "Findings Judged",
)
#: Ages at or above this are written as this (HIPAA Safe Harbor: ages over 89 are grouped).
AGE_CAP = 90


class ExportError(Exception):
    """The export cannot be written (the message says why, in one line)."""


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote."""

    studies: int
    images: int
    skipped: int
    patients: int
    out: Path


def _age(value: Any) -> str:
    """``058Y`` -> ``58``; months, weeks and days -> ``0``; capped at :data:`AGE_CAP`."""
    match = re.fullmatch(r"\s*(\d{1,3})\s*([YMWD]?)\s*", str(value or ""))
    if not match:
        return ""
    years = int(match.group(1)) if match.group(2) in ("Y", "") else 0
    return str(min(years, AGE_CAP))


def _spacing(ds: Any) -> tuple[str, str]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2:
                return f"{float(value[1]):g}", f"{float(value[0]):g}"  # x = column spacing
        except (TypeError, ValueError):
            continue
    return "", ""


def _choice(value: Any, allowed: tuple[str, ...]) -> str:
    text = str(value or "").strip().upper()
    return text if text in allowed else ""


def render_png(path: Path, size: int, out: Path) -> None:
    """The DICOM at ``path`` through the serving path, as an 8-bit ``size`` px square PNG."""
    from PIL import Image

    from triage_core.imaging import load_image, to_tensor
    from triage_core.spec import ModelSpec

    spec = ModelSpec(arch="export", input_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    square = np.asarray(to_tensor(load_image(path), spec)[0], dtype=np.float32)
    pixels = np.rint(np.clip(square, 0.0, 1.0) * 255.0).astype(np.uint8)
    Image.fromarray(pixels).save(out, format="PNG", optimize=False)


def export_feedback(worklist: Worklist, out: Path, salt: str, image_size: int) -> ExportSummary:
    """Write ``labels.csv``, ``images/`` and ``provenance.csv`` under ``out`` (see the module
    docstring).

    Raises
    ------
    ExportError
        ``out`` exists and is not an empty folder, or cannot be written.
    """
    from triage_core.errors import ImageReadError
    from triage_core.imaging import read_dataset

    if not 32 <= image_size <= 2048:
        raise ExportError(f"--image-size {image_size} must lie in [32, 2048]")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: give a new --out")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out}: {exc.strerror or exc}") from exc
    studies = worklist.feedback.export_studies()
    labels: list[list[str]] = []
    provenance: list[list[str]] = []
    follow_up: dict[str, int] = defaultdict(int)
    skipped = 0
    written_studies = 0
    for study in studies:
        study_hash = hash_identifier(study.study_uid, salt)
        wrote = False
        for _sop, spool_path in study.images:
            path = Path(spool_path)
            try:
                ds = read_dataset(path, stop_before_pixels=True)
                patient = hash_identifier(str(ds.get("PatientID", "") or ""), salt) or study_hash
                name = f"{patient}_{follow_up[patient]:03d}.png"
                render_png(path, image_size, out / "images" / name)
            except (ImageReadError, OSError, ValueError) as exc:
                skipped += 1
                logger.warning(
                    "export: an image of study %s is skipped: %s", study_hash, type(exc).__name__
                )
                continue
            follow_up[patient] += 1
            wrote = True
            spacing_x, spacing_y = _spacing(ds)
            labels.append(
                [
                    name,
                    "|".join(study.labels) or "No Finding",
                    str(follow_up[patient] - 1),
                    patient,
                    _age(ds.get("PatientAge")),
                    _choice(ds.get("PatientSex"), ("M", "F", "O")),
                    _choice(ds.get("ViewPosition"), ("PA", "AP")),
                    str(int(ds.get("Columns", 0) or 0)),
                    str(int(ds.get("Rows", 0) or 0)),
                    spacing_x,
                    spacing_y,
                ]
            )
            provenance.append(
                [
                    name,
                    study_hash,
                    study.model_name,
                    study.model_version,
                    str(study.readers),
                    str(study.judged),
                ]
            )
        written_studies += int(wrote)
    try:
        for filename, header, rows in (
            ("labels.csv", LABEL_HEADER, labels),
            ("provenance.csv", PROVENANCE_HEADER, provenance),
        ):
            with open(out / filename, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle, lineterminator="\n")
                writer.writerow(header)
                writer.writerows(rows)
    except OSError as exc:
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}") from exc
    logger.info(
        "exported %d images of %d studies (%d skipped) to %s",
        len(labels),
        written_studies,
        skipped,
        out,
    )
    return ExportSummary(written_studies, len(labels), skipped, len(follow_up), out)
