"""Shared parts of the DICOM output builders: codes, UIDs, equipment and provenance, checks.

Used by the Structured Report (:mod:`.sr`, :mod:`.report_builder`), the Secondary Capture
(:mod:`.sc`) and the SR reader (:mod:`.read`); it imports none of them.
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code

from triage_core import __version__ as CODE_VERSION
from triage_core.errors import DicomOutputError
from triage_core.spec import PRIORITY_LEVELS, Finding, ModelSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import highdicom

logger = logging.getLogger(__name__)

#: Manufacturer written into every object we create and into Contributing Equipment.
MANUFACTURER = "cxr-triage"
#: Plain statement carried by both outputs.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SR_SERIES_DESCRIPTION = "cxr-triage AI (NOT FOR DIAGNOSTIC USE)"
SC_SERIES_DESCRIPTION = "cxr-triage Grad-CAM (NOT FOR DIAGNOSTIC USE)"
PM_SERIES_DESCRIPTION = "cxr-triage Grad-CAM map (NOT FOR DIAGNOSTIC USE)"
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
#: Geometric purpose of a finding's region (CID 219): the box bounds the finding.
BOUNDED_BY = Code("75958009", "SCT", "Bounded by")
#: Out-of-distribution score of the study's least typical image (``triage_core.ood``).
OOD_SCORE = Code("OODSCORE", PRIVATE_SCHEME, "Out-of-distribution score")
#: Present: some image is unlike the model's training images (score above the threshold).
LOW_CONFIDENCE = Code("LOWCONFIDENCE", PRIVATE_SCHEME, "Low confidence (atypical input)")
#: TID 1500's container of the study-level judgements (findings, priority, low confidence).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: Concept of the image a finding's judgement was inferred from.
SOURCE_OF_MEASUREMENT = Code("121112", "DCM", "Source of Measurement")
COMMENT = Code("121106", "DCM", "Comment")
ENGLISH = Code("en-US", "RFC5646", "English (United States)")  # the report's language
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
    return Code(_private_value(name, 16), PRIVATE_SCHEME, _text(name, 64))


def _private_value(name: str, limit: int) -> str:
    """A private code value from a class name: its letters and digits, upper case."""
    return re.sub(r"[^A-Za-z0-9]", "", name).upper()[:limit] or "FINDING"


def labelled_probability(name: str) -> Code:
    """The concept of a region's probability: ``<name> probability`` (private code).

    Why not DCM 122157 "Probability" as in the Qualitative Evaluations: OHIF labels a region
    with its measurements' concept names only (not its finding type), so there the concept
    itself names the finding.
    """
    return Code(f"{_private_value(name, 12)}PROB", PRIVATE_SCHEME, _text(f"{name} probability", 64))


def finding_name(code: Any) -> str:
    """The class name that :func:`finding_code` coded as ``code`` (its inverse)."""
    for name, known in FINDING_CODES.items():
        if (known.value, known.scheme_designator) == (code.value, code.scheme_designator):
            return name
    return str(code.meaning)


def _is_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def _text(value: str, limit: int) -> str:
    """A value safe for LO/SH/ST text: no backslash or control characters, at most ``limit``."""
    cleaned = re.sub(r"[\\\x00-\x1f\x7f]", " ", value).strip()
    return cleaned[:limit]


def _model_name(spec: ModelSpec) -> str:
    return _text(spec.name or spec.arch, 64) or spec.arch[:64]


def default_device_uid(spec: ModelSpec, weights_digest: str = "") -> str:
    """The Device UID of a model: a new model version (or new weights) gives a new UID.

    The UID is ``2.25.`` followed by the integer of a name-based (version 5) UUID (PS3.5 B.2) of
    the model's identity: manufacturer, architecture, name, version and, when given, the
    digest of its weights (``triage_core.models.weights_digest``). The same identity always
    gives the same UID, on every node; changing any part of it gives another.

    Parameters
    ----------
    spec : ModelSpec
    weights_digest : str, optional
        Hex digest of the weights file ("" when unknown: the UID then follows the spec alone).

    Returns
    -------
    str
    """
    parts = [MANUFACTURER, spec.arch, spec.name, spec.version]
    if weights_digest:
        parts.append(weights_digest.lower())
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, chr(0x1F).join(parts)).int}"


def _device_uid(spec: ModelSpec, device_uid: str | None) -> str:
    """``device_uid`` checked, or the model's default Device UID when it is ``None``."""
    if device_uid is None:
        return default_device_uid(spec)
    if not _is_uid(device_uid):
        raise DicomOutputError(f"device_uid {device_uid!r} is not a valid UID")
    return device_uid


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


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
        raise DicomOutputError(f"{name}: expected a non-negative integer, got {value!r}")
