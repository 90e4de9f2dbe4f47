"""Reading our Structured Report back: findings, priority and the low-confidence flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from triage_core.dicom_out.common import (
    ABSENT,
    LOW_CONFIDENCE,
    OOD_SCORE,
    PRESENT,
    PRIORITY,
    PRIORITY_LEVEL_CODES,
    PRIORITY_SCORE,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    finding_name,
)
from triage_core.dicom_out.regions import CamRegion
from triage_core.errors import DicomOutputError

#: Suffix of a region group's tracking identifier (as :mod:`.sr` writes it).
_REGION_SUFFIX = " region"


def _evaluations(ds: Dataset | str | Path) -> list[Dataset]:
    """The CODE items of the report's "Qualitative Evaluations" container (TID 1500)."""
    report = _report(ds)
    for item in report[0].ContentSequence:
        concept = item.ConceptNameCodeSequence[0]
        if item.ValueType == "CONTAINER" and (
            concept.CodeValue,
            concept.CodingSchemeDesignator,
        ) == (QUALITATIVE_EVALUATIONS.value, QUALITATIVE_EVALUATIONS.scheme_designator):
            return [c for c in item.get("ContentSequence", []) if c.ValueType == "CODE"]
    raise DicomOutputError("SR holds no Qualitative Evaluations container")


def _code(sequence: Any) -> Code:
    item = sequence[0]
    return Code(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _same(a: Code, b: Code) -> bool:
    return (a.value, a.scheme_designator) == (b.value, b.scheme_designator)


def _numbers(item: Dataset) -> dict[tuple[str, str], float]:
    """A judgement's NUM children by concept; the FD Floating Point Value where present
    (exact), else the DS Numeric Value."""
    numbers = {}
    for child in item.get("ContentSequence", []):
        if child.ValueType != "NUM" or not child.get("MeasuredValueSequence"):
            continue
        measured = child.MeasuredValueSequence[0]
        concept = _code(child.ConceptNameCodeSequence)
        value = measured.get("FloatingPointValue", measured.NumericValue)
        numbers[(concept.value, concept.scheme_designator)] = float(value)
    return numbers


def _judgement(evaluations: list[Dataset], name: Code) -> Dataset | None:
    found = [item for item in evaluations if _same(_code(item.ConceptNameCodeSequence), name)]
    if len(found) > 1:
        raise DicomOutputError(f"SR holds {len(found)} {name.meaning!r} evaluations")
    return found[0] if found else None


def _number(item: Dataset, concept: Code, what: str) -> float:
    value = _numbers(item).get((concept.value, concept.scheme_designator))
    if value is None:
        raise DicomOutputError(f"SR {what}: no {concept.meaning!r} value")
    return value


def _is_present(item: Dataset, what: str) -> bool:
    value = _code(item.ConceptCodeSequence)
    if _same(value, PRESENT):
        return True
    if _same(value, ABSENT):
        return False
    raise DicomOutputError(f"SR {what}: unexpected evaluation {value!r}")


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
    for item in _evaluations(ds):
        concept = _code(item.ConceptNameCodeSequence)
        if _same(concept, PRIORITY) or _same(concept, LOW_CONFIDENCE):
            continue
        name = finding_name(concept)
        findings[name] = (_number(item, PROBABILITY, name), _is_present(item, name))
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
        When the dataset is not such an SR or has no study priority.
    """
    levels = {(c.value, c.scheme_designator): level for level, c in PRIORITY_LEVEL_CODES.items()}
    item = _judgement(_evaluations(ds), PRIORITY)
    if item is None:
        raise DicomOutputError("SR holds no study priority")
    value = _code(item.ConceptCodeSequence)
    level = levels.get((value.value, value.scheme_designator))
    if level is None:
        raise DicomOutputError(f"SR priority: unknown level {value!r}")
    return _number(item, PRIORITY_SCORE, "priority"), level


def low_confidence_from_sr(ds: Dataset | str | Path) -> tuple[float, bool] | None:
    """``(OOD score, low confidence)`` from an SR made by :func:`build_sr`, or ``None`` when
    the model that made it had no out-of-distribution reference.

    Raises
    ------
    DicomOutputError
        When the dataset is not such an SR or has no study priority.
    """
    evaluations = _evaluations(ds)
    if _judgement(evaluations, PRIORITY) is None:
        raise DicomOutputError("SR holds no study priority")
    item = _judgement(evaluations, LOW_CONFIDENCE)
    if item is None:
        return None
    return _number(item, OOD_SCORE, "low confidence"), _is_present(item, "low confidence")


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
