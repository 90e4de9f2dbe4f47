"""The Structured Report: :func:`build_sr` and the TID 1500 / TID 1501 content it is made of.

See the package docstring for the report's content. :class:`~.report_builder.ReportBuilder`
reuses the content builders here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from triage_core.dicom_out.common import (
    ABSENT,
    BOUNDED_BY,
    CHEST_IMAGING,
    COMMENT,
    ENGLISH,
    LOW_CONFIDENCE,
    MANUFACTURER,
    OOD_SCORE,
    PRESENT,
    PRIORITY,
    PRIORITY_LEVEL_CODES,
    PRIORITY_SCORE,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    RESEARCH_STATEMENT,
    SOURCE_OF_MEASUREMENT,
    SR_SERIES_DESCRIPTION,
    THRESHOLD,
    UNIT_ONE,
    UNIT_SCORE,
    _algorithm_equipment,
    _check_finding,
    _check_number,
    _coding_schemes,
    _device_uid,
    _is_uid,
    _model_name,
    _require_attrs,
    _sanitized_reference,
    _software_versions,
    _text,
    finding_code,
    labelled_probability,
)
from triage_core.dicom_out.regions import REGION_FRACTION, CamRegion
from triage_core.errors import DicomOutputError
from triage_core.spec import PRIORITY_LEVELS, Finding, ModelSpec, StudyResult

#: Suffix of the tracking identifier of a finding's region group (``Atelectasis region``).
REGION_SUFFIX = " region"
REGION_RULE = (
    f"region=bounding box of the 8-connected Grad-CAM component at or above "
    f"{REGION_FRACTION:g} of its peak that holds the peak"
)

logger = logging.getLogger(__name__)


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
    regions: Mapping[str, CamRegion] | None = None,
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
    regions : mapping of str to CamRegion, optional
        Image regions of findings judged present, by finding name
        (:func:`~.regions.cam_region`); each becomes a TID 1410 group under "Imaging
        Measurements": tracking identifier ``<name> region``, the finding type, a closed SCOORD
        POLYLINE on the region's source image (Geometric Purpose "Bounded by"), the finding's
        probability (concept ``<name> probability``), its "Present" evaluation, and the
        threshold and region rule among the algorithm parameters. Without regions the report
        has no "Imaging Measurements".

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
    located = _check_regions(regions, result, by_uid)
    try:
        root = _report_root(spec, device_uid)
        root.ContentSequence.extend(_report_containers(result, spec, by_uid, located))
        sr = _comprehensive_sr(result, source_list, spec, device_uid, root, series_number,
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


def _check_regions(
    regions: Mapping[str, CamRegion] | None, result: StudyResult, by_uid: dict[str, Dataset]
) -> list[tuple[Finding, CamRegion]]:
    """The regions as ``(finding, region)`` in the findings' order, each checked."""
    if regions is None:
        return []
    if not isinstance(regions, Mapping):
        raise DicomOutputError(f"regions: expected a mapping, got {type(regions).__name__}")
    findings = {f.name: f for f in result.findings}
    unknown = sorted(set(regions) - set(findings))
    if unknown:
        raise DicomOutputError(f"regions: {unknown} are not findings of the result")
    located = []
    for name, finding in findings.items():
        region = regions.get(name)
        if region is None:
            continue
        if not isinstance(region, CamRegion):
            raise DicomOutputError(
                f"regions[{name!r}]: expected a CamRegion, got {type(region).__name__}"
            )
        if not finding.present:
            raise DicomOutputError(
                f"regions[{name!r}]: the finding is judged absent; regions are for present ones"
            )
        source = by_uid.get(region.source_uid)
        if source is None:
            raise DicomOutputError(
                f"regions[{name!r}]: image {region.source_uid!r} is not among the sources"
            )
        _require_attrs(source, f"source image of the {name} region", ("Rows", "Columns"))
        if region.right > int(source.Columns) + 1e-6 or region.bottom > int(source.Rows) + 1e-6:
            raise DicomOutputError(
                f"regions[{name!r}]: box ({region.left}, {region.top}, {region.right}, "
                f"{region.bottom}) exceeds the {source.Columns}x{source.Rows} image"
            )
        located.append((finding, region))
    return located


def _region_group(
    finding: Finding, region: CamRegion, spec: ModelSpec, by_uid: dict[str, Dataset]
) -> Any:
    """The TID 1410 group of a finding's image region."""
    import highdicom as hd

    source = by_uid[region.source_uid]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding.name + REGION_SUFFIX),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=region.polyline(),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source),
        ),
        finding_type=finding_code(finding.name),
        algorithm_id=_algorithm_id(
            spec, [*_finding_parameters(spec, float(finding.threshold)), REGION_RULE]
        ),
        measurements=[
            hd.sr.Measurement(
                name=labelled_probability(finding.name),
                value=float(finding.probability),
                unit=UNIT_ONE,
            )
        ],
        qualitative_evaluations=[_evaluation(finding)],
        geometric_purpose=BOUNDED_BY,
    )


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


def _evaluation(finding: Finding) -> Any:
    import highdicom as hd

    return hd.sr.QualitativeEvaluation(
        name=finding_code(finding.name), value=PRESENT if finding.present else ABSENT
    )


def _judgement(name: Any, value: Any, numbers: list[tuple[Any, float, Any]]) -> Any:
    """A CODE item of the Qualitative Evaluations container (``name`` = ``value``) with its
    numbers as HAS PROPERTIES children: ``(concept, value, unit)`` each."""
    import highdicom as hd

    item = hd.sr.CodeContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.NumContentItem(
                name=concept,
                value=number,
                unit=unit,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            )
            for concept, number, unit in numbers
        ]
    )
    return item


def _finding_judgement(finding: Finding, by_uid: dict[str, Dataset]) -> Any:
    """A finding's CODE item: present or absent, its probability and threshold, and the image
    it was inferred from (when that is one of the sources)."""
    import highdicom as hd

    item = _judgement(
        finding_code(finding.name),
        PRESENT if finding.present else ABSENT,
        [
            (PROBABILITY, float(finding.probability), UNIT_ONE),
            (THRESHOLD, float(finding.threshold), UNIT_ONE),
        ],
    )
    if finding.source_uid:
        source = by_uid.get(finding.source_uid)
        if source is None:
            raise DicomOutputError(
                f"finding {finding.name} comes from image {finding.source_uid!r}, "
                "which is not among the sources"
            )
        _require_attrs(source, f"source image of {finding.name}", ("SOPClassUID",))
        item.ContentSequence.append(
            hd.sr.ImageContentItem(
                name=SOURCE_OF_MEASUREMENT,
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
            )
        )
    return item


def _qualitative_evaluations(
    result: StudyResult, spec: ModelSpec, by_uid: dict[str, Dataset]
) -> Any:
    """TID 1500's "Qualitative Evaluations" container: every finding's judgement, the study
    priority and, when the model has an out-of-distribution reference, the low-confidence flag,
    each a CODE item with its numbers, then the research-use statement.

    Why here and not as TID 1501 groups under "Imaging Measurements": a group there without an
    image region of its own makes OHIF 3.13 fail on the whole report (it reads the first
    coordinate of every measurement group); the regions of present findings are TID 1410
    groups there (:func:`_region_group`).
    """
    import highdicom as hd

    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items = [_finding_judgement(finding, by_uid) for finding in result.findings]
    items.append(
        _judgement(
            PRIORITY,
            PRIORITY_LEVEL_CODES[result.priority_level],
            [(PRIORITY_SCORE, float(result.priority_score), UNIT_SCORE)],
        )
    )
    if spec.ood:
        score = result.ood_score
        items.append(
            _judgement(
                LOW_CONFIDENCE,
                PRESENT if result.low_confidence else ABSENT,
                [
                    (OOD_SCORE, float(score if score is not None else 0.0), UNIT_SCORE),
                    (THRESHOLD, float(spec.ood["threshold"]), UNIT_SCORE),
                ],
            )
        )
    items.append(
        hd.sr.TextContentItem(
            name=COMMENT,
            value=RESEARCH_STATEMENT,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _report_root(spec: ModelSpec, device_uid: str) -> Any:
    """TID 1500's root container with its context: language, observer (the algorithm as a
    device), procedure reported. :func:`_report_containers` gives what follows.

    Built here from highdicom's content items rather than by ``highdicom.sr.MeasurementReport``,
    which (0.28) requires at least one measurement group and has no "Qualitative Evaluations"
    container, the two things this report needs; the items are the ones it would write.
    """
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
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport,
                                      template_id="1500")  # fmt: skip
    root.ContentSequence = hd.sr.ContentSequence()
    root.ContentSequence.extend(
        hd.sr.LanguageOfContentItemAndDescendants(
            hd.sr.CodedConcept(ENGLISH.value, ENGLISH.scheme_designator, ENGLISH.meaning)
        )
    )
    root.ContentSequence.extend(observation_context)
    root.ContentSequence.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=CHEST_IMAGING,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    return root


def _report_containers(
    result: StudyResult,
    spec: ModelSpec,
    by_uid: dict[str, Dataset],
    located: list[tuple[Finding, CamRegion]],
) -> list[Any]:
    """The containers under the root: "Imaging Measurements" with one TID 1410 group per
    located finding (none without regions), then "Qualitative Evaluations"."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    containers = []
    if located:
        measurements = hd.sr.ContainerContentItem(
            name=codes.DCM.ImagingMeasurements,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        measurements.ContentSequence = hd.sr.ContentSequence()
        for finding, region in located:
            measurements.ContentSequence.extend(_region_group(finding, region, spec, by_uid))
        containers.append(measurements)
    containers.append(_qualitative_evaluations(result, spec, by_uid))
    return containers


def _comprehensive_sr(
    result: StudyResult,
    source_list: list[Dataset],
    spec: ModelSpec,
    device_uid: str,
    root: Any,
    series_number: int,
    instance_number: int,
) -> Any:
    """The Comprehensive 3D SR document around the content tree ``root`` (header, evidence,
    equipment)."""
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
        content=root,
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
