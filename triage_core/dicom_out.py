"""DICOM output builders: the findings as a Structured Report, the Grad-CAM as a Secondary Capture.

Both builders only *build* datasets (DESIGN.md section 6); sending is ``dicom_node.scu``'s job.
They validate their inputs first and raise :class:`~triage_core.errors.DicomOutputError` with a
message that names the bad value, then let highdicom assemble the objects.

Structured Report (:func:`build_sr`)
    A Comprehensive 3D SR whose root is TID 1500 "Imaging Measurement Report" (what OHIF and
    most SR-aware viewers render). The observer is the algorithm (a *device* observer whose UID
    is the device UID). Under "Imaging Measurements" there is one TID 1501 measurement group per
    finding, each with

    * a tracking identifier (the class name, e.g. ``Atelectasis``) and a new tracking UID,
    * the finding type (SNOMED CT / DICOM code where one exists, a private ``99CXRTRIAGE`` code
      otherwise),
    * TID 4019 Algorithm Identification (model name, version, manufacturer ``cxr-triage``,
      the operating threshold and the research-use statement as parameters),
    * the calibrated probability as a numeric measurement, concept (DCM 122157 "Probability"),
      **unit UCUM ``1`` ("no units"): a number in [0, 1], not a percentage**,
    * the operating threshold as a numeric measurement (private code ``THRESHOLD``, unit ``1``),
    * a qualitative evaluation: concept = the finding type, value SCT 52101004 "Present" or
      SCT 272519000 "Absent" (``probability >= threshold``),
    * a reference to the source image that gave the probability (when it is one of ``sources``).

    One more group (tracking identifier ``Study priority``, finding type SCT 260870009
    "Priority") carries the study priority: the score in [0, 100] (private code
    ``PRIORITYSCORE``, unit UCUM ``{score}``) and the level as a qualitative evaluation whose
    value is a private code ``ROUTINE`` / ``URGENT`` / ``CRITICAL``.

    Header: patient and study attributes copied from the sources (same Study Instance UID, new
    Series Instance UID), VerificationFlag ``UNVERIFIED``, CompletionFlag ``COMPLETE``,
    PreliminaryFlag ``PRELIMINARY``, Series Description ``cxr-triage AI (NOT FOR DIAGNOSTIC
    USE)``, every source listed in Current Requested Procedure Evidence Sequence, and the
    algorithm in Contributing Equipment Sequence as IHE AI Results asks (Purpose of Reference
    ``(Newcode1, 99IHE, "Processing Algorithm")``, Manufacturer ``cxr-triage``, Manufacturer's
    Model Name = model name, Software Versions = model version and code version, Device UID).

Secondary Capture (:func:`build_sc`)
    An RGB Secondary Capture of the Grad-CAM overlay in the same study, new series, derived from
    the source image (Source Image Sequence with purpose DCM 121322 "Source image for image
    processing operation", Derivation Description, Image Type ``DERIVED\\SECONDARY``). A short
    caption (finding, probability, "NOT FOR DIAGNOSTIC USE") is burned into a black band at the
    top of the image when the image is at least 64 pixels wide and high (BurnedInAnnotation
    ``YES``), and is always written into Image Comments. Body Part Examined is copied from the
    source (``CHEST`` when absent).

:func:`findings_from_sr` and :func:`priority_from_sr` read our SR back (tests and the DICOM
node's end-to-end checks compare it with the worklist).

highdicom and Pillow are imported inside the functions: nothing here slows down the C-STORE path.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code

from triage_core import __version__ as CODE_VERSION
from triage_core.errors import DicomOutputError
from triage_core.spec import PRIORITY_LEVELS, Finding, ModelSpec, StudyResult

if TYPE_CHECKING:  # pragma: no cover - typing only
    import highdicom

logger = logging.getLogger(__name__)

#: Manufacturer written into every object we create and into Contributing Equipment.
MANUFACTURER = "cxr-triage"
#: Plain statement carried by both outputs.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SR_SERIES_DESCRIPTION = "cxr-triage AI (NOT FOR DIAGNOSTIC USE)"
SC_SERIES_DESCRIPTION = "cxr-triage Grad-CAM (NOT FOR DIAGNOSTIC USE)"
RESEARCH_STATEMENT = "Research tool output, NOT FOR DIAGNOSTIC USE; not reviewed by a physician"
#: Tracking identifier of the measurement group that carries the study priority.
PRIORITY_TRACKING_ID = "Study priority"

#: Private coding scheme for concepts that have no standard code.
PRIVATE_SCHEME = "99CXRTRIAGE"
#: IHE AI Results: Purpose of Reference of the algorithm's Contributing Equipment item.
IHE_PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")

PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD = Code("THRESHOLD", PRIVATE_SCHEME, "Operating threshold")
PRIORITY = Code("260870009", "SCT", "Priority")
PRIORITY_SCORE = Code("PRIORITYSCORE", PRIVATE_SCHEME, "Triage priority score")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
UNIT_ONE = Code("1", "UCUM", "no units")
UNIT_SCORE = Code("{score}", "UCUM", "score")
CHEST_IMAGING = Code("413815006", "SCT", "Chest imaging")
#: Out-of-distribution score of the study's least typical image (``triage_core.ood``).
OOD_SCORE = Code("OODSCORE", PRIVATE_SCHEME, "Out-of-distribution score")
#: Present: some image is unlike the model's training images (score above the threshold).
LOW_CONFIDENCE = Code("LOWCONFIDENCE", PRIVATE_SCHEME, "Low confidence (atypical input)")
SOURCE_IMAGE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
PRIORITY_LEVEL_CODES: dict[str, Code] = {
    level: Code(level.upper(), PRIVATE_SCHEME, level) for level in PRIORITY_LEVELS
}
#: Finding types for the classes we know; other class names get a private code.
FINDING_CODES: dict[str, Code] = {
    "Atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "Effusion": Code("60046008", "SCT", "Pleural effusion"),
    "Infiltration": Code("112121", "DCM", "Infiltrate"),
}

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_CS_RE = re.compile(r"^[A-Z0-9 _]{1,16}$")
_ORIENTATION_RE = re.compile(r"^[APRLHF]{1,3}$")
_MIN_CAPTION_SIDE = 64
_TEXT_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UI UR UT".split())
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def finding_code(name: str) -> Code:
    """The coded finding type for a class name (private code when no standard one is known).

    Parameters
    ----------
    name : str
        Class name from ``ModelSpec.class_names``.

    Returns
    -------
    pydicom.sr.coding.Code
    """
    if name in FINDING_CODES:
        return FINDING_CODES[name]
    value = re.sub(r"[^A-Za-z0-9]", "", name).upper()[:16] or "FINDING"
    return Code(value, PRIVATE_SCHEME, _text(name, 64))


def _is_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def _text(value: str, limit: int) -> str:
    """A value safe for LO/SH/ST text: no backslash or control characters, at most ``limit``."""
    cleaned = re.sub(r"[\\\x00-\x1f\x7f]", " ", value).strip()
    return cleaned[:limit]


def _model_name(spec: ModelSpec) -> str:
    return _text(spec.name or spec.arch, 64) or spec.arch[:64]


def default_device_uid(spec: ModelSpec) -> str:
    """A stable Device UID for a model: the same name, architecture and version give the same UID.

    Parameters
    ----------
    spec : ModelSpec

    Returns
    -------
    str
        A ``2.25.`` UID derived from the model identity.
    """
    # A name-based (version 5) UUID in the 2.25 UID root (PS3.5 B.2): reproducible, unique.
    key = "\x1f".join((MANUFACTURER, spec.arch, spec.name, spec.version))
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, key).int}"


def _software_versions(spec: ModelSpec) -> list[str]:
    return [_text(f"model {spec.version}", 64), _text(f"cxr-triage {CODE_VERSION}", 64)]


def _algorithm_equipment(spec: ModelSpec, device_uid: str) -> highdicom.ContributingEquipment:
    """Contributing Equipment item for the algorithm, in the form IHE AI Results asks for."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_model_name(spec),
        software_versions=_software_versions(spec),
        contribution_description=_text(
            f"AI triage by {spec.display_name}; {RESEARCH_STATEMENT}", 1024
        ),
    )
    # highdicom only accepts DCM purposes; IHE AIR uses its own code for "Processing Algorithm".
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(IHE_PROCESSING_ALGORITHM)]
    item.DeviceUID = device_uid
    return item


def _coding_schemes() -> list[Any]:
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name="cxr-triage private codes",
            responsible_organization=MANUFACTURER,
        ),
        CodingSchemeIdentificationItem(
            designator="99IHE",
            name="IHE private codes",
            responsible_organization="IHE",
        ),
    ]


def _invalid_text(element: Any) -> str | None:
    """Why a text element's value breaks its VR, or ``None`` when it is valid (or not text)."""
    from pydicom import config
    from pydicom.valuerep import validate_value

    if element.VR not in _TEXT_VRS or element.value is None:
        return None
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    try:
        for value in values:
            validate_value(element.VR, str(value), validation_mode=config.RAISE)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _sequence_is_valid(element: Any) -> bool:
    for item in element.value or []:
        for nested in item:
            if nested.VR == "SQ" and not _sequence_is_valid(nested):
                return False
            if _invalid_text(nested) is not None:
                return False
    return True


def _valid_elements(ds: Dataset, what: str) -> Dataset:
    """A copy of ``ds`` without pixel data, private tags and values that break their VR.

    An invalid value at the top level drops that attribute; one inside a sequence drops the
    whole sequence (removing a single nested attribute could leave an invalid item behind).
    """
    copy = Dataset()
    for element in ds:
        if element.tag.group == 0x7FE0 or element.tag.is_private:
            continue
        if element.VR == "SQ":
            if not _sequence_is_valid(element):
                logger.debug("%s: dropping %s (invalid values inside)", what, element.keyword)
                continue
        elif (reason := _invalid_text(element)) is not None:
            logger.debug("%s: dropping invalid %s (%s)", what, element.keyword, reason)
            continue
        copy.add(element)
    return copy


def _sanitized_reference(ds: Dataset, what: str) -> Dataset:
    """A header-only copy of ``ds`` for highdicom to copy patient/study data from.

    Values that break their VR (e.g. a Patient's Age ``62`` without unit, seen in real files)
    are dropped instead of being copied into our objects; everything that is copied is valid.
    """
    copy = _valid_elements(ds, what)
    # highdicom reads these Type 2 attributes unconditionally; absent or invalid -> empty.
    for keyword in _TYPE2_COPIED:
        if keyword not in copy:
            setattr(copy, keyword, "")
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    return copy


def _require_attrs(ds: Dataset, what: str, keywords: Sequence[str]) -> None:
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None or value == "":
            raise DicomOutputError(f"{what}: required attribute {keyword} is missing or empty")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if keyword in keywords and not _is_uid(str(ds.get(keyword))):
            raise DicomOutputError(f"{what}: {keyword} {str(ds.get(keyword))!r} is not a valid UID")


def _check_probability(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
        raise DicomOutputError(f"{what}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise DicomOutputError(f"{what}: expected a value in [0, 1], got {value!r}")
    return number


def _check_finding(finding: object, spec: ModelSpec, what: str) -> Finding:
    if not isinstance(finding, Finding):
        raise DicomOutputError(f"{what}: expected a Finding, got {type(finding).__name__}")
    if finding.name not in spec.class_names:
        raise DicomOutputError(
            f"{what}: finding {finding.name!r} is not one of the model's classes "
            f"{list(spec.class_names)}"
        )
    probability = _check_probability(f"{what} {finding.name} probability", finding.probability)
    threshold = _check_probability(f"{what} {finding.name} threshold", finding.threshold)
    if bool(finding.present) != (probability >= threshold):
        raise DicomOutputError(
            f"{what}: finding {finding.name} says present={finding.present} but probability "
            f"{probability} vs threshold {threshold} says the opposite"
        )
    return finding


# --------------------------------------------------------------------------------------------
# Structured Report
# --------------------------------------------------------------------------------------------


def _check_sources(sources: Sequence[Dataset], study_uid: str) -> list[Dataset]:
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise DicomOutputError(
            f"sources: expected a sequence of pydicom Datasets, got {type(sources).__name__}"
        )
    if len(sources) == 0:
        raise DicomOutputError("sources: at least one source image dataset is required")
    seen: set[str] = set()
    patient_ids: set[str] = set()
    for index, ds in enumerate(sources):
        what = f"sources[{index}]"
        if not isinstance(ds, Dataset):
            raise DicomOutputError(f"{what}: expected a pydicom Dataset, got {type(ds).__name__}")
        _require_attrs(
            ds,
            what,
            ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"),
        )
        if ds.StudyInstanceUID != study_uid:
            raise DicomOutputError(
                f"{what}: StudyInstanceUID {ds.StudyInstanceUID} differs from the result's study "
                f"{study_uid}; all sources must come from that one study"
            )
        if ds.SOPInstanceUID in seen:
            raise DicomOutputError(f"{what}: duplicate SOPInstanceUID {ds.SOPInstanceUID}")
        seen.add(ds.SOPInstanceUID)
        patient_ids.add(str(ds.get("PatientID", "")))
    if len(patient_ids) > 1:
        raise DicomOutputError(
            f"sources: the study's images disagree on PatientID ({len(patient_ids)} values)"
        )
    return list(sources)


def _check_result(result: StudyResult, spec: ModelSpec) -> None:
    if not isinstance(result, StudyResult):
        raise DicomOutputError(f"result: expected a StudyResult, got {type(result).__name__}")
    if not isinstance(spec, ModelSpec):
        raise DicomOutputError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    if result.status == "not_eligible":
        raise DicomOutputError(
            f"study {result.study_uid} is not eligible ({result.reason or 'no reason given'}): "
            "no SR is built for it"
        )
    if result.status != "done":
        raise DicomOutputError(
            f"study {result.study_uid}: status {result.status!r}, an SR needs status 'done'"
        )
    if not _is_uid(result.study_uid):
        raise DicomOutputError(f"result: study_uid {result.study_uid!r} is not a valid UID")
    if not result.findings:
        raise DicomOutputError(f"study {result.study_uid} is 'done' but has no findings")
    names = [f.name for f in result.findings if isinstance(f, Finding)]
    for index, finding in enumerate(result.findings):
        _check_finding(finding, spec, f"result.findings[{index}]")
    if len(set(names)) != len(names):
        raise DicomOutputError(f"result: duplicate findings in {names}")
    score = result.priority_score
    if (
        isinstance(score, bool)
        or not isinstance(score, int | float | np.floating)
        or not math.isfinite(float(score))
        or not 0.0 <= float(score) <= 100.0
    ):
        raise DicomOutputError(f"result: priority_score must lie in [0, 100], got {score!r}")
    if result.priority_level not in PRIORITY_LEVELS:
        raise DicomOutputError(
            f"result: priority_level {result.priority_level!r} is not one of {PRIORITY_LEVELS}"
        )


def build_sr(
    result: StudyResult,
    sources: Sequence[Dataset],
    spec: ModelSpec,
    *,
    series_number: int = 9901,
    instance_number: int = 1,
    device_uid: str | None = None,
) -> Dataset:
    """Build the Comprehensive 3D SR (TID 1500) that reports a study's findings and priority.

    Parameters
    ----------
    result : StudyResult
        A ``done`` study result with at least one finding (``not_eligible`` is refused: nothing
        is sent for those studies).
    sources : sequence of pydicom.Dataset
        The study's images (header-only datasets are enough, pixel data is never read). Each must
        carry the result's Study Instance UID. Patient and study attributes are copied from the
        first one; all are listed as evidence.
    spec : ModelSpec
        The model that produced the result (name, version, thresholds).
    series_number, instance_number : int
        Series Number and Instance Number of the new SR.
    device_uid : str, optional
        Device UID of the algorithm (observer and Contributing Equipment). Default: a UID derived
        from the model's name, architecture and version (:func:`default_device_uid`).

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.sr.Comprehensive3DSR`` with file meta, ready to ``save_as``.

    Raises
    ------
    DicomOutputError
        When an input is invalid; the message names the value.
    """
    _check_result(result, spec)
    source_list = _check_sources(sources, result.study_uid)
    _check_number("series_number", series_number)
    _check_number("instance_number", instance_number)
    device_uid = _device_uid(spec, device_uid)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_list}
    try:
        groups = [_finding_group(finding, spec, by_uid) for finding in result.findings]
        groups.append(_priority_group(result, spec))
        report = _measurement_report(spec, device_uid, groups)
        sr = _comprehensive_sr(result, source_list, spec, device_uid, report, series_number,
                               instance_number)  # fmt: skip
    except (ValueError, TypeError, KeyError) as exc:
        raise DicomOutputError(f"study {result.study_uid}: SR could not be built: {exc}") from exc
    logger.debug(
        "built SR %s for study %s (%d findings)",
        sr.SOPInstanceUID,
        result.study_uid,
        len(result.findings),
    )
    return sr


def _device_uid(spec: ModelSpec, device_uid: str | None) -> str:
    if device_uid is None:
        return default_device_uid(spec)
    if not _is_uid(device_uid):
        raise DicomOutputError(f"device_uid {device_uid!r} is not a valid UID")
    return device_uid


def _algorithm_id(spec: ModelSpec, parameters: list[str]) -> Any:
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(
        name=_model_name(spec),
        version=_text(spec.version, 64) or "0",
        manufacturer=MANUFACTURER,
        parameters=parameters,
    )


def _finding_parameters(spec: ModelSpec, threshold: float) -> list[str]:
    return [
        f"architecture={spec.arch}",
        f"task={spec.task}",
        f"threshold={threshold:.6g}",
        RESEARCH_STATEMENT,
    ]


def _tracking(identifier: str) -> Any:
    import highdicom as hd

    return hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier)


def _probability(finding: Finding) -> Any:
    import highdicom as hd

    return hd.sr.Measurement(name=PROBABILITY, value=float(finding.probability), unit=UNIT_ONE)


def _evaluation(finding: Finding) -> Any:
    import highdicom as hd

    return hd.sr.QualitativeEvaluation(
        name=finding_code(finding.name), value=PRESENT if finding.present else ABSENT
    )


def _source_image(finding: Finding, by_uid: dict[str, Dataset]) -> Any:
    """TID 1501 source image item of a finding (``None`` without a source UID)."""
    import highdicom as hd

    if not finding.source_uid:
        return None
    if finding.source_uid not in by_uid:
        raise DicomOutputError(
            f"finding {finding.name} comes from image {finding.source_uid!r}, "
            "which is not among the sources"
        )
    source = by_uid[finding.source_uid]
    _require_attrs(source, f"source image of {finding.name}", ("Modality", "Rows", "Columns"))
    return hd.sr.SourceImageForMeasurementGroup.from_source_image(source)


def _priority_score(result: StudyResult) -> Any:
    import highdicom as hd

    return hd.sr.Measurement(
        name=PRIORITY_SCORE, value=float(result.priority_score), unit=UNIT_SCORE
    )


def _priority_level(result: StudyResult) -> Any:
    import highdicom as hd

    return hd.sr.QualitativeEvaluation(
        name=PRIORITY, value=PRIORITY_LEVEL_CODES[result.priority_level]
    )


def _finding_group(finding: Finding, spec: ModelSpec, by_uid: dict[str, Dataset]) -> Any:
    """The TID 1501 measurement group of one finding."""
    import highdicom as hd

    threshold = float(finding.threshold)
    index = spec.class_names.index(finding.name)
    if threshold != spec.thresholds[index]:
        logger.debug(
            "finding %s uses threshold %s, the spec says %s",
            finding.name,
            threshold,
            spec.thresholds[index],
        )
    source = _source_image(finding, by_uid)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding.name),
        finding_type=finding_code(finding.name),
        algorithm_id=_algorithm_id(spec, _finding_parameters(spec, threshold)),
        measurements=[
            _probability(finding),
            hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=UNIT_ONE),
        ],
        qualitative_evaluations=[_evaluation(finding)],
        source_images=[source] if source is not None else None,
    )


def _ood_score(result: StudyResult) -> Any:
    import highdicom as hd

    score = result.ood_score
    return hd.sr.Measurement(
        name=OOD_SCORE, value=float(score if score is not None else 0.0), unit=UNIT_SCORE
    )


def _low_confidence(result: StudyResult) -> Any:
    import highdicom as hd

    return hd.sr.QualitativeEvaluation(
        name=LOW_CONFIDENCE, value=PRESENT if result.low_confidence else ABSENT
    )


def _priority_group(result: StudyResult, spec: ModelSpec) -> Any:
    """The measurement group that carries the study priority (score and level) and, when the
    model has an out-of-distribution reference, the OOD score and the low-confidence flag."""
    import highdicom as hd

    measurements = [_priority_score(result)]
    evaluations = [_priority_level(result)]
    parameters = [RESEARCH_STATEMENT]
    if spec.ood:
        measurements.append(_ood_score(result))
        evaluations.append(_low_confidence(result))
        parameters.insert(0, f"ood_threshold={float(spec.ood['threshold']):.6g}")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(PRIORITY_TRACKING_ID),
        finding_type=PRIORITY,
        algorithm_id=_algorithm_id(spec, parameters),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _measurement_report(spec: ModelSpec, device_uid: str, groups: list[Any]) -> Any:
    """The TID 1500 root (observer = the algorithm as a device) over ``groups``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model_name = _model_name(spec)
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid,
                name=_text(f"cxr-triage {model_name}", 64),
                manufacturer_name=MANUFACTURER,
                model_name=model_name,
            ),
        )
    )
    return hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=CHEST_IMAGING,
        imaging_measurements=groups,
    )


def _comprehensive_sr(
    result: StudyResult,
    source_list: list[Dataset],
    spec: ModelSpec,
    device_uid: str,
    report: Any,
    series_number: int,
    instance_number: int,
) -> Any:
    """The Comprehensive 3D SR document around ``report`` (header, evidence, equipment)."""
    import highdicom as hd

    # highdicom copies patient/study data from the first evidence item: make that the image
    # behind the top finding (an eligible radiograph), not whatever was received first.
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_list}
    top = result.top_finding
    first = by_uid.get(top.source_uid) if top is not None else None
    ordered = ([first] if first is not None else []) + [ds for ds in source_list if ds is not first]
    evidence = [_sanitized_reference(ds, f"source {ds.SOPInstanceUID}") for ds in ordered]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=_model_name(spec),
        software_versions=_software_versions(spec),
        coding_schemes=_coding_schemes(),
        contributing_equipment=[_algorithm_equipment(spec, device_uid)],
    )


class ReportBuilder:
    """Builds :func:`build_sr`'s report for one model, several times faster, for the workers.

    :func:`build_sr` spends most of its time in highdicom re-checking and deep-copying content
    that is the same for every study of a model (observer context, algorithm identification,
    thresholds, codes). Here highdicom builds that document once per *layout* (the findings'
    names, thresholds and whether each has a source image), and each study's report is

    * a fresh copy of the layout's content tree (unpickled from bytes encoded once: nothing is
      shared between two reports, so no edit of one can reach another),
    * in which the study's own items are put, each built by the same highdicom call as in
      :func:`build_sr`: tracking identifier and UID, probability, present/absent evaluation,
      source image reference, priority score and level,
    * inside a Comprehensive 3D SR document that highdicom builds for the study (header,
      patient and study attributes, evidence, contributing equipment) around the layout's
      highdicom-built root; the document's root content items (Value Type, Concept Name,
      Continuity, Template, Content Sequence) are then replaced by the study's fresh copies.

    The result has the same content as :func:`build_sr`'s, element for element (tested on the
    encoded bytes, UIDs and creation times aside), passes ``dciodvfy`` and reads back with
    highdicom. It is a plain :class:`pydicom.Dataset` with file meta; use
    ``highdicom.sr.Comprehensive3DSR.from_dataset`` for highdicom's accessors.

    Parameters
    ----------
    spec : ModelSpec
        The model whose results are reported.
    device_uid : str, optional
        As in :func:`build_sr`.
    """

    def __init__(self, spec: ModelSpec, device_uid: str | None = None) -> None:
        if not isinstance(spec, ModelSpec):
            raise DicomOutputError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
        self.spec = spec
        self.device_uid = _device_uid(spec, device_uid)
        self._layouts: dict[tuple[tuple[str, float, bool], ...], _Layout] = {}
        self._lock = threading.Lock()

    def build(
        self,
        result: StudyResult,
        sources: Sequence[Dataset],
        *,
        series_number: int = 9901,
        instance_number: int = 1,
    ) -> Dataset:
        """The SR of ``result`` (same arguments, checks and errors as :func:`build_sr`)."""
        import pickle

        spec = self.spec
        _check_result(result, spec)
        source_list = _check_sources(sources, result.study_uid)
        _check_number("series_number", series_number)
        _check_number("instance_number", instance_number)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in source_list}
        layout = self._layout(result.findings)
        try:
            root_items = pickle.loads(layout.content)  # a fresh copy for this study
            content = root_items.ContentSequence
            groups = content[layout.container].ContentSequence
            for finding, slots in zip(result.findings, layout.groups, strict=False):
                tracking = _tracking(finding.name)
                _put(groups[slots.group], slots.tracking, tracking[0])
                _put(groups[slots.group], slots.tracking_uid, tracking[1])
                _put(groups[slots.group], slots.value, _probability(finding)[0])
                _put(groups[slots.group], slots.evaluation, _evaluation(finding)[0])
                source = _source_image(finding, by_uid)
                if source is not None:
                    _put(groups[slots.group], slots.source, source)
            slots = layout.groups[-1]
            tracking = _tracking(PRIORITY_TRACKING_ID)
            _put(groups[slots.group], slots.tracking, tracking[0])
            _put(groups[slots.group], slots.tracking_uid, tracking[1])
            _put(groups[slots.group], slots.value, _priority_score(result)[0])
            _put(groups[slots.group], slots.evaluation, _priority_level(result)[0])
            if spec.ood:
                _put(groups[slots.group], slots.ood_value, _ood_score(result)[0])
                _put(groups[slots.group], slots.ood_evaluation, _low_confidence(result)[0])
            # the document around the layout's root; its root items are replaced below
            sr = _comprehensive_sr(
                result, source_list, spec, self.device_uid, layout.root, series_number,
                instance_number,
            )  # fmt: skip
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise DicomOutputError(
                f"study {result.study_uid}: SR could not be built: {exc}"
            ) from exc
        out = Dataset()
        out.update(sr)
        # highdicom put the layout root's own elements at the top of the document: replace
        # every one with this study's fresh copy, so no element is shared between two reports
        for element in root_items:
            out[element.tag] = element
        out.file_meta = sr.file_meta
        out.preamble = sr.preamble
        logger.debug(
            "built SR %s for study %s (layout cached)", out.SOPInstanceUID, result.study_uid
        )
        return out

    def _layout(self, findings: Sequence[Finding]) -> _Layout:
        key = tuple((f.name, float(f.threshold), bool(f.source_uid)) for f in findings)
        with self._lock:
            layout = self._layouts.get(key)
            if layout is None:
                layout = self._layouts[key] = _make_layout(self.spec, self.device_uid, key)
            return layout


#: The root content item's attributes, at the top level of an SR document.
_ROOT_ITEMS = (
    "ValueType",
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentTemplateSequence",
    "ContentSequence",
)
_TRACKING_ID = "112039"
_TRACKING_UID = "112040"
_SOURCE_IMAGE_TYPE = "IMAGE"


@dataclass(frozen=True)
class _Slots:
    """Where a measurement group's study-specific items sit in its Content Sequence."""

    group: int
    tracking: int
    tracking_uid: int
    value: int
    evaluation: int
    source: int
    ood_value: int = -1  # priority group only, when the model has an OOD reference
    ood_evaluation: int = -1


@dataclass(frozen=True)
class _Layout:
    content: bytes  # pickled root content items (plain pydicom datasets), read back as encoded
    container: int  # index of the "Imaging Measurements" container in the Content Sequence
    groups: tuple[_Slots, ...]  # one per finding, then the priority group
    root: Any  # highdicom's TID 1500 root: only read (deep-copied) by the SR constructor


def _put(group: Dataset, index: int, item: Dataset) -> None:
    if index < 0:
        raise DicomOutputError("SR layout: a study-specific item has no slot in its group")
    group.ContentSequence[index] = item


def _make_layout(
    spec: ModelSpec, device_uid: str, key: tuple[tuple[str, float, bool], ...]
) -> _Layout:
    """Build a report of this layout with highdicom once and note where the study's items go."""
    import io
    import pickle

    import pydicom
    from pydicom.uid import generate_uid

    study_uid = generate_uid()
    source = Dataset()
    source.StudyInstanceUID = study_uid
    source.SeriesInstanceUID = generate_uid()
    source.SOPInstanceUID = generate_uid()
    source.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    source.Modality = "CR"
    source.Rows = 8
    source.Columns = 8
    findings = tuple(
        Finding(name=name, probability=1.0, threshold=threshold, present=True,
                source_uid=str(source.SOPInstanceUID) if has_source else "")
        for name, threshold, has_source in key
    )  # fmt: skip
    result = StudyResult(
        study_uid=study_uid,
        status="done",
        findings=findings,
        priority_score=0.0,
        priority_level=PRIORITY_LEVELS[0],
    )
    by_uid = {str(source.SOPInstanceUID): source}
    groups = [_finding_group(finding, spec, by_uid) for finding in findings]
    groups.append(_priority_group(result, spec))
    root = _measurement_report(spec, device_uid, groups)
    sr = _comprehensive_sr(result, [source], spec, device_uid, root, 9901, 1)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    # read back: plain datasets whose elements stay encoded (raw) until touched, so unpickling
    # and writing the parts no study changes stays cheap
    plain = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    content = plain.ContentSequence
    container = next(
        i
        for i, item in enumerate(content)
        if item.ValueType == "CONTAINER"
        and item.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
    )
    names = [f.name for f in findings] + [PRIORITY_TRACKING_ID]
    evaluation_names = [finding_code(f.name).value for f in findings] + [PRIORITY.value]
    value_names = [PROBABILITY.value] * len(findings) + [PRIORITY_SCORE.value]
    slots = []
    for index, group in enumerate(content[container].ContentSequence):
        items = list(group.ContentSequence)

        def find(value_type: str, code: str | None, items: list[Dataset] = items) -> int:
            for i, item in enumerate(items):
                concept = item.ConceptNameCodeSequence[0].CodeValue
                if item.ValueType == value_type and (code is None or concept == code):
                    return i
            return -1

        tracking = find("TEXT", _TRACKING_ID)
        if tracking < 0 or items[tracking].TextValue != names[index]:
            raise DicomOutputError(f"SR layout: group {index} is not {names[index]!r}")
        slots.append(
            _Slots(
                group=index,
                tracking=tracking,
                tracking_uid=find("UIDREF", _TRACKING_UID),
                value=find("NUM", value_names[index]),
                evaluation=find("CODE", evaluation_names[index]),
                source=find(_SOURCE_IMAGE_TYPE, None),
                ood_value=find("NUM", OOD_SCORE.value),
                ood_evaluation=find("CODE", LOW_CONFIDENCE.value),
            )
        )
    if len(slots) != len(names):
        raise DicomOutputError(f"SR layout: {len(slots)} groups, expected {len(names)}")
    root_items = Dataset()
    for keyword in _ROOT_ITEMS:
        root_items[keyword] = plain[keyword]
    blob = pickle.dumps(root_items, protocol=pickle.HIGHEST_PROTOCOL)
    # the header's root: no image references (they would have to be among each study's evidence)
    header_root = _measurement_report(spec, device_uid, [_priority_group(result, spec)])
    return _Layout(blob, container, tuple(slots), header_root)


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
        raise DicomOutputError(f"{name}: expected a non-negative integer, got {value!r}")


# --------------------------------------------------------------------------------------------
# Secondary Capture
# --------------------------------------------------------------------------------------------


def _caption(finding: Finding) -> tuple[str, ...]:
    """Captions from the most to the least informative; the first that fits is burned in."""
    state = "present" if finding.present else "absent"
    return (
        f"{finding.name} p={finding.probability:.2f} ({state}, threshold "
        f"{finding.threshold:.2f}) | Grad-CAM | {NOT_FOR_DIAGNOSTIC_USE}",
        f"{finding.name} p={finding.probability:.2f} | {NOT_FOR_DIAGNOSTIC_USE}",
        f"{finding.name} p={finding.probability:.2f}",
    )


def burn_in_caption(image: np.ndarray, captions: Sequence[str]) -> tuple[np.ndarray, bool]:
    """Write the first caption that fits onto a black band at the top of an RGB image.

    Parameters
    ----------
    image : numpy.ndarray
        H x W x 3 uint8 RGB image (not modified).
    captions : sequence of str
        Candidate captions, longest first.

    Returns
    -------
    tuple of (numpy.ndarray, bool)
        The captioned copy, and whether a caption was burned in (images narrower or lower than
        64 pixels are returned unchanged).
    """
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    if height < _MIN_CAPTION_SIDE or width < _MIN_CAPTION_SIDE:
        return image.copy(), False
    band = max(12, min(height // 20, 64))
    margin = max(2, band // 6)
    # Only a strip at the top goes through Pillow (band plus room for descenders), not the
    # whole image: one copy of the image, and a few rows converted back and forth.
    strip_rows = min(height, 2 * band)
    strip = Image.fromarray(np.ascontiguousarray(image[:strip_rows]), mode="RGB")
    draw = ImageDraw.Draw(strip)
    for text in captions:
        size = band - 2 * margin
        while size >= 8:
            font = _font(size)
            if draw.textlength(text, font=font) <= width - 2 * margin:
                draw.rectangle((0, 0, width - 1, band - 1), fill=(0, 0, 0))
                draw.text((margin, margin), text, fill=(255, 255, 255), font=font)
                out = image.copy()
                out[:strip_rows] = np.asarray(strip, dtype=np.uint8)
                return out, True
            size -= 1
    return image.copy(), False


@functools.lru_cache(maxsize=64)
def _font(size: int) -> Any:
    """Pillow's default (FreeType) font at ``size`` pixels, loaded once per size."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _check_overlay(overlay: object) -> np.ndarray:
    if not isinstance(overlay, np.ndarray):
        raise DicomOutputError(f"overlay: expected a numpy array, got {type(overlay).__name__}")
    if overlay.dtype != np.uint8:
        raise DicomOutputError(f"overlay: expected dtype uint8 (RGB), got {overlay.dtype}")
    if overlay.ndim != 3 or overlay.shape[2] != 3:
        raise DicomOutputError(f"overlay: expected shape (H, W, 3), got {overlay.shape}")
    rows, cols = overlay.shape[:2]
    if not (8 <= rows <= 65535 and 8 <= cols <= 65535):
        raise DicomOutputError(f"overlay: {rows}x{cols} pixels, each side must lie in [8, 65535]")
    return np.ascontiguousarray(overlay)


def _orientation(source: Dataset) -> list[str] | None:
    value = source.get("PatientOrientation")
    if value is None or value == "":
        return None
    values = [
        str(v)
        for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else [value])
    ]
    if len(values) == 2 and all(_ORIENTATION_RE.match(v) for v in values):
        return values
    return None


def build_sc(
    overlay: np.ndarray,
    source: Dataset,
    finding: Finding,
    spec: ModelSpec,
    *,
    series_number: int = 9902,
    instance_number: int = 1,
) -> Dataset:
    """Build the RGB Secondary Capture that shows a Grad-CAM overlay for one finding.

    Parameters
    ----------
    overlay : numpy.ndarray
        H x W x 3 uint8 RGB overlay, normally at the source image's resolution.
    source : pydicom.Dataset
        The image the map was computed on (header-only is enough). Patient and study attributes
        are copied from it and it is referenced in Source Image Sequence.
    finding : Finding
        The finding the map explains; its name and probability go into the caption. When
        ``finding.source_uid`` is a UID it must be the source's SOP Instance UID.
    spec : ModelSpec
        The model (name and version go into Derivation Description and Contributing Equipment).
    series_number, instance_number : int
        Series Number and Instance Number of the new image.

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.sc.SCImage`` (Explicit VR Little Endian) with file meta.

    Raises
    ------
    DicomOutputError
        When an input is invalid; the message names the value.
    """
    pixels = _check_sc_inputs(overlay, source, finding, spec, series_number, instance_number)
    captions = _caption(finding)
    captioned, burned = burn_in_caption(pixels, captions)
    reference = _sanitized_reference(source, "source")
    sc = _sc_image(source, reference, captioned, spec, series_number, instance_number)
    _describe_sc(sc, reference, finding, spec, captions, burned)
    _reference_source(sc, reference, source)
    logger.debug(
        "built SC %s for %s (%s, caption burned in: %s)",
        sc.SOPInstanceUID,
        source.SOPInstanceUID,
        finding.name,
        burned,
    )
    return sc


def _check_sc_inputs(
    overlay: object,
    source: object,
    finding: object,
    spec: object,
    series_number: object,
    instance_number: object,
) -> np.ndarray:
    """:func:`build_sc`'s argument checks; returns the overlay as a uint8 array."""
    pixels = _check_overlay(overlay)
    if not isinstance(spec, ModelSpec):
        raise DicomOutputError(f"spec: expected a ModelSpec, got {type(spec).__name__}")
    if not isinstance(source, Dataset):
        raise DicomOutputError(f"source: expected a pydicom Dataset, got {type(source).__name__}")
    _require_attrs(source, "source", ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"))
    checked = _check_finding(finding, spec, "finding")
    if _is_uid(checked.source_uid) and checked.source_uid != source.SOPInstanceUID:
        raise DicomOutputError(
            f"finding {checked.name} comes from image {checked.source_uid}, but the overlay's "
            f"source is {source.SOPInstanceUID}"
        )
    _check_number("series_number", series_number)
    _check_number("instance_number", instance_number)
    return pixels


def _sc_image(
    source: Dataset,
    reference: Dataset,
    pixels: np.ndarray,
    spec: ModelSpec,
    series_number: int,
    instance_number: int,
) -> Dataset:
    """The highdicom ``SCImage`` (new series, same study) around the captioned pixels."""
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    laterality = reference.get("Laterality")
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=reference,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=hd.UID(),
            series_number=series_number,
            sop_instance_uid=hd.UID(),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            # Placeholder for highdicom's check; replaced by the source's value or empty.
            patient_orientation=("L", "F"),
            laterality=laterality if laterality in ("R", "L") else None,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[_algorithm_equipment(spec, default_device_uid(spec))],
            series_description=SC_SERIES_DESCRIPTION,
            manufacturer_model_name=_model_name(spec),
            software_versions=_software_versions(spec),
            coding_schemes=_coding_schemes(),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise DicomOutputError(
            f"source {source.SOPInstanceUID}: Secondary Capture could not be built: {exc}"
        ) from exc
    # Type 2: the source's orientation when it is valid, otherwise present but empty.
    orientation = _orientation(source)
    sc["PatientOrientation"].value = orientation if orientation is not None else ""
    return sc


def _describe_sc(
    sc: Dataset,
    reference: Dataset,
    finding: Finding,
    spec: ModelSpec,
    captions: Sequence[str],
    burned: bool,
) -> None:
    """Body part, burned-in annotation flag, caption and derivation description."""
    body_part = str(reference.get("BodyPartExamined", "") or "")
    sc.BodyPartExamined = body_part if _CS_RE.match(body_part) else "CHEST"
    sc.BurnedInAnnotation = (
        "YES" if burned or reference.get("BurnedInAnnotation") == "YES" else "NO"
    )
    sc.ImageComments = _text(captions[0], 10240)
    sc.DerivationDescription = _text(
        f"Grad-CAM heat map for {finding.name} (probability {finding.probability:.3f}, "
        f"threshold {finding.threshold:.2f}) by {spec.display_name} ({spec.arch}), blended "
        f"over the source image; {RESEARCH_STATEMENT}",
        1024,
    )


def _reference_source(sc: Dataset, reference: Dataset, source: Dataset) -> None:
    """Source Image Sequence, and the lossy-compression flag inherited from the source."""
    import highdicom as hd

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_IMAGE_PURPOSE)]
    sc.SourceImageSequence = [item]
    if reference.get("LossyImageCompression") == "01":
        # Once lossy, always lossy (PS3.3 C.7.6.1.1.5): derived images keep the flag.
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in reference:
                sc[keyword] = reference[keyword]


# --------------------------------------------------------------------------------------------
# Reading our SR back
# --------------------------------------------------------------------------------------------


def _measurement_groups(ds: Dataset | str | Path) -> list[Any]:
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
        report = hd.sr.MeasurementReport.from_sequence([root], is_root=True, copy=True)
        return list(report.get_image_measurement_groups())
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


__all__ = [
    "MANUFACTURER",
    "NOT_FOR_DIAGNOSTIC_USE",
    "ReportBuilder",
    "build_sc",
    "build_sr",
    "burn_in_caption",
    "default_device_uid",
    "finding_code",
    "findings_from_sr",
    "low_confidence_from_sr",
    "priority_from_sr",
]
