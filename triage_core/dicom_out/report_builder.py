"""The Structured Report, faster: :class:`ReportBuilder` and the per-model layouts it caches."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from triage_core.dicom_out.common import (
    LOW_CONFIDENCE,
    OOD_SCORE,
    PRIORITY,
    PRIORITY_SCORE,
    PRIORITY_TRACKING_ID,
    PROBABILITY,
    _check_number,
    finding_code,
)
from triage_core.dicom_out.regions import CamRegion
from triage_core.dicom_out.sr import (
    _check_regions,
    _check_result,
    _check_sources,
    _comprehensive_sr,
    _device_uid,
    _evaluation,
    _finding_group,
    _low_confidence,
    _measurement_report,
    _ood_score,
    _priority_group,
    _priority_level,
    _priority_score,
    _probability,
    _region_group,
    _source_image,
    _tracking,
)
from triage_core.errors import DicomOutputError
from triage_core.spec import PRIORITY_LEVELS, Finding, ModelSpec, StudyResult

logger = logging.getLogger(__name__)


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
        regions: Mapping[str, CamRegion] | None = None,
    ) -> Dataset:
        """The SR of ``result`` (same arguments, checks and errors as :func:`build_sr`); the
        region groups are built for each study and appended after the priority group."""
        import pickle

        spec = self.spec
        _check_result(result, spec)
        source_list = _check_sources(sources, result.study_uid)
        _check_number("series_number", series_number)
        _check_number("instance_number", instance_number)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in source_list}
        located = _check_regions(regions, result, by_uid)
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
            for finding, region in located:
                groups.append(_region_group(finding, region, spec, by_uid)[0])
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
