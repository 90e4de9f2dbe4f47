"""DICOM output builders: the findings as a Structured Report, the Grad-CAM as a Secondary Capture
and as a Parametric Map.

The builders only *build* datasets (DESIGN.md section 6); sending is the node's job
(``dicom_node.stages.deliver``: C-STORE or STOW-RS).
They validate their inputs first and raise :class:`~triage_core.errors.DicomOutputError` with a
message that names the bad value, then let highdicom assemble the objects.

Structured Report (:func:`build_sr`)
    A Comprehensive 3D SR whose root is TID 1500 "Imaging Measurement Report" (what OHIF and
    most SR-aware viewers render). The observer is the algorithm (a *device* observer whose UID
    is the device UID). Under the root, after language, observer and procedure reported:

    "Imaging Measurements" (DCM 126010), only when some finding judged present has a region:
    one TID 1410 group per such finding, tracking identifier ``<name> region`` and a new
    tracking UID, the finding type (SNOMED CT / DICOM code where one exists, a private
    ``99CXRTRIAGE`` code otherwise), TID 4019 Algorithm Identification (model name, version,
    manufacturer ``cxr-triage``; threshold, region rule and research-use statement as
    parameters), the image region as a closed SCOORD POLYLINE on the source image (Geometric
    Purpose "Bounded by"; the rule is in :mod:`.regions`: bounding box of the CAM's connected
    component at or above half its peak, in source pixels), the probability under a private
    concept ``<name> probability`` (OHIF labels a region with its measurements' concept names
    and nothing else) and the "Present" evaluation.

    "Qualitative Evaluations" (UMLS C0034375), always: the study's judgements, one CODE item
    each, with their numbers as HAS PROPERTIES children:

    * per finding: concept = the finding type, value SCT 52101004 "Present" or SCT 272519000
      "Absent" (``probability >= threshold``); the calibrated probability (DCM 122157
      "Probability", **unit UCUM ``1``: a number in [0, 1], not a percentage**), the operating
      threshold (private ``THRESHOLD``, unit ``1``) and, INFERRED FROM, the source image that
      gave the probability (when it is one of ``sources``);
    * the study priority: concept SCT 260870009 "Priority", value a private code ``ROUTINE`` /
      ``URGENT`` / ``CRITICAL``, with the score in [0, 100] (private ``PRIORITYSCORE``, unit
      UCUM ``{score}``);
    * when the model has an out-of-distribution reference: private ``LOWCONFIDENCE`` = Present
      or Absent, with the OOD score and its threshold;
    * a TEXT "Comment" with the research-use statement.

    Why not one TID 1501 measurement group per finding and one for the priority under "Imaging
    Measurements" (the earlier layout): OHIF 3.13 reads the first image coordinate
    of every measurement group there and fails on the whole report (error boundary) when a
    group has none; absent findings and the priority have no region. Numbers are exact: each
    NUM carries the FD Floating Point Value next to the 16-character DS.

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

Parametric Map (:func:`build_pm`)
    The Grad-CAM heat map itself (16-bit values with a Real World Value Mapping onto the map's
    0..1 scale) referencing the source image, same study, new series, as IHE AI Results asks for
    maps; the SC stays for viewers that cannot overlay a map. The module docstring of
    :mod:`.pm` says how a projection radiograph without Frame of Reference gets its geometry.
    :func:`heatmap_from_pm` reads the map back.

:func:`findings_from_sr` and :func:`priority_from_sr` read our SR back (tests and the DICOM
node's end-to-end checks compare it with the worklist).

The package's modules, by what they build: :mod:`.common` (codes, UIDs, equipment and
provenance, input checks), :mod:`.sr` (:func:`build_sr`), :mod:`.report_builder`
(:class:`ReportBuilder`), :mod:`.sc` (:func:`build_sc`), :mod:`.pm` (:func:`build_pm`) and
:mod:`.read` (the readers).

highdicom and Pillow are imported inside the functions: nothing here slows down the C-STORE path.
"""

from triage_core.dicom_out.common import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSTIC_USE,
    default_device_uid,
    finding_code,
)
from triage_core.dicom_out.pm import build_pm, heatmap_from_pm
from triage_core.dicom_out.read import (
    findings_from_sr,
    low_confidence_from_sr,
    priority_from_sr,
    regions_from_sr,
)
from triage_core.dicom_out.regions import REGION_FRACTION, CamRegion, cam_region
from triage_core.dicom_out.report_builder import ReportBuilder
from triage_core.dicom_out.sc import build_sc, burn_in_caption
from triage_core.dicom_out.sr import build_sr

__all__ = [
    "MANUFACTURER",
    "REGION_FRACTION",
    "CamRegion",
    "NOT_FOR_DIAGNOSTIC_USE",
    "ReportBuilder",
    "build_pm",
    "build_sc",
    "build_sr",
    "burn_in_caption",
    "cam_region",
    "default_device_uid",
    "finding_code",
    "findings_from_sr",
    "heatmap_from_pm",
    "low_confidence_from_sr",
    "priority_from_sr",
    "regions_from_sr",
]
