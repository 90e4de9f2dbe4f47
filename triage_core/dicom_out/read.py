"""Reading our Structured Report back: findings, priority and the low-confidence flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from triage_core.dicom_out.common import (
    ABSENT,
    LOW_CONFIDENCE,
    OOD_SCORE,
    PRESENT,
    PRIORITY,
    PRIORITY_LEVEL_CODES,
    PRIORITY_SCORE,
    PRIORITY_TRACKING_ID,
    PROBABILITY,
)
from triage_core.dicom_out.regions import CamRegion
from triage_core.errors import DicomOutputError

#: Suffix of a region group's tracking identifier (as :mod:`.sr` writes it).
_REGION_SUFFIX = " region"


def _measurement_groups(ds: Dataset | str | Path) -> list[Any]:
    return list(_report(ds).get_image_measurement_groups())


def _report(ds: Dataset | str | Path) -> Any:
    import highdicom as hd
    import pydicom

    if isinstance(ds, str | Path):
        try:
            ds = pydicom.dcmread(ds)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise DicomOutputError(f"{ds}: cannot read SR: {exc}") from exc
    if not isinstance(ds, Dataset):
        raise DicomOutputError(f"expected a pydicom Dataset or a path, got {type(ds).__name__}")
    if "ContentSequence" not in ds:
        raise DicomOutputError(
            f"dataset {ds.get('SOPInstanceUID', '?')} is not a Structured Report (no content)"
        )
    try:
        root = Dataset()
        for keyword in (
            "ValueType",
            "ConceptNameCodeSequence",
            "ContinuityOfContent",
            "ContentTemplateSequence",
            "ContentSequence",
        ):
            if keyword in ds:
                root[keyword] = ds[keyword]
        return hd.sr.MeasurementReport.from_sequence([root], is_root=True, copy=True)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise DicomOutputError(
            f"SR {ds.get('SOPInstanceUID', '?')} is not a TID 1500 report we can read: {exc}"
        ) from exc


def findings_from_sr(ds: Dataset | str | Path) -> dict[str, tuple[float, bool]]:
    """Read the findings back from an SR made by :func:`build_sr`.

    Parameters
    ----------
    ds : pydicom.Dataset or path
        The SR dataset (or file).

    Returns
    -------
    dict
        ``{class name: (probability, present)}`` in the SR's order. Probabilities are exact:
        each NUM item carries the FD Floating Point Value next to the 16-character DS.

    Raises
    ------
    DicomOutputError
        When the dataset is not such an SR.
    """
    findings: dict[str, tuple[float, bool]] = {}
    for group in _measurement_groups(ds):
        name = group.tracking_identifier
        if name is None or name == PRIORITY_TRACKING_ID:
            continue
        probabilities = group.get_measurements(name=PROBABILITY)
        evaluations = group.get_qualitative_evaluations()
        if len(probabilities) != 1 or len(evaluations) != 1:
            raise DicomOutputError(
                f"SR group {name!r}: expected one probability and one evaluation, found "
                f"{len(probabilities)} and {len(evaluations)}"
            )
        value = evaluations[0].value
        if value == PRESENT:
            present = True
        elif value == ABSENT:
            present = False
        else:
            raise DicomOutputError(f"SR group {name!r}: unexpected evaluation {value!r}")
        findings[str(name)] = (float(probabilities[0].value), present)
    if not findings:
        raise DicomOutputError("SR holds no findings")
    return findings


def priority_from_sr(ds: Dataset | str | Path) -> tuple[float, str]:
    """Read the study priority back from an SR made by :func:`build_sr`.

    Parameters
    ----------
    ds : pydicom.Dataset or path
        The SR dataset (or file).

    Returns
    -------
    tuple of (float, str)
        ``(score in [0, 100], level)`` with level one of ``PRIORITY_LEVELS``.

    Raises
    ------
    DicomOutputError
        When the dataset is not such an SR or has no priority group.
    """
    levels = {(c.value, c.scheme_designator): level for level, c in PRIORITY_LEVEL_CODES.items()}
    for group in _measurement_groups(ds):
        if group.tracking_identifier != PRIORITY_TRACKING_ID:
            continue
        scores = group.get_measurements(name=PRIORITY_SCORE)
        evaluations = group.get_qualitative_evaluations(name=PRIORITY)
        if len(scores) != 1 or len(evaluations) != 1:
            raise DicomOutputError("SR priority group: expected one score and one level")
        value = evaluations[0].value
        level = levels.get((value.value, value.scheme_designator))
        if level is None:
            raise DicomOutputError(f"SR priority group: unknown level {value!r}")
        return float(scores[0].value), level
    raise DicomOutputError("SR holds no study priority group")


def low_confidence_from_sr(ds: Dataset | str | Path) -> tuple[float, bool] | None:
    """``(OOD score, low confidence)`` from an SR made by :func:`build_sr`, or ``None`` when
    the model that made it had no out-of-distribution reference.

    Raises
    ------
    DicomOutputError
        When the dataset is not such an SR or has no priority group.
    """
    for group in _measurement_groups(ds):
        if group.tracking_identifier != PRIORITY_TRACKING_ID:
            continue
        scores = group.get_measurements(name=OOD_SCORE)
        flags = group.get_qualitative_evaluations(name=LOW_CONFIDENCE)
        if not scores and not flags:
            return None
        if len(scores) != 1 or len(flags) != 1:
            raise DicomOutputError("SR priority group: expected one OOD score and one flag")
        value = flags[0].value
        return float(scores[0].value), (value.value, value.scheme_designator) == (
            PRESENT.value,
            PRESENT.scheme_designator,
        )
    raise DicomOutputError("SR holds no study priority group")


def regions_from_sr(ds: Dataset | str | Path) -> dict[str, CamRegion]:
    """The image regions of the findings judged present, from an SR made by :func:`build_sr`.

    Returns
    -------
    dict
        ``{class name: CamRegion}`` (box from the closed POLYLINE, source from its image
        reference); empty when the SR has no region.

    Raises
    ------
    DicomOutputError
        When the dataset is not such an SR, or a region is not a closed four-corner box.
    """
    import numpy as np

    regions: dict[str, CamRegion] = {}
    try:
        groups = _report(ds).get_planar_roi_measurement_groups()
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise DicomOutputError(f"SR regions cannot be read: {exc}") from exc
    for group in groups:
        name = str(group.tracking_identifier or "")
        if not name.endswith(_REGION_SUFFIX):
            continue
        roi = group.roi
        if roi is None or roi.GraphicType != "POLYLINE":
            raise DicomOutputError(f"SR group {name!r}: expected a POLYLINE region")
        points = np.asarray(roi.value, dtype=np.float64).reshape(-1, 2)
        if len(points) != 5 or not np.array_equal(points[0], points[-1]):
            raise DicomOutputError(f"SR group {name!r}: expected a closed box of 5 points")
        source_uid = str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        regions[name[: -len(_REGION_SUFFIX)]] = CamRegion(
            source_uid=source_uid,
            left=float(points[:, 0].min()),
            top=float(points[:, 1].min()),
            right=float(points[:, 0].max()),
            bottom=float(points[:, 1].max()),
        )
    return regions
