"""The Structured Report, faster: :class:`ReportBuilder` and the report root it caches per model."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from pydicom.dataset import Dataset

from triage_core.dicom_out.common import _check_number
from triage_core.dicom_out.regions import CamRegion
from triage_core.dicom_out.sr import (
    _check_regions,
    _check_result,
    _check_sources,
    _comprehensive_sr,
    _device_uid,
    _report_containers,
    _report_root,
)
from triage_core.errors import DicomOutputError
from triage_core.spec import ModelSpec, StudyResult

logger = logging.getLogger(__name__)


class ReportBuilder:
    """Builds :func:`build_sr`'s report for one model, faster, for the workers.

    :func:`build_sr` spends much of its time in highdicom re-checking and deep-copying content
    that is the same for every study of a model: the report root's context (language, the
    algorithm as device observer, procedure reported). Here highdicom builds that root once
    per model, and each study's report is

    * a fresh copy of the root's content items (unpickled from bytes encoded once: nothing is
      shared between two reports, so no edit of one can reach another),
    * to which the study's containers are appended, built by the same highdicom calls as in
      :func:`build_sr` ("Imaging Measurements" with the regions, "Qualitative Evaluations"),
    * inside a Comprehensive 3D SR document that highdicom builds for the study (header,
      patient and study attributes, evidence, contributing equipment) around the cached
      highdicom root; the document's root content items (Value Type, Concept Name,
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
        self._root: tuple[bytes, Any] | None = None
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
        """The SR of ``result`` (same arguments, checks and errors as :func:`build_sr`)."""
        import pickle

        spec = self.spec
        _check_result(result, spec)
        source_list = _check_sources(sources, result.study_uid)
        _check_number("series_number", series_number)
        _check_number("instance_number", instance_number)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in source_list}
        located = _check_regions(regions, result, by_uid)
        encoded, root = self._cached_root()
        try:
            root_items = pickle.loads(encoded)  # a fresh copy for this study
            root_items.ContentSequence.extend(_report_containers(result, spec, by_uid, located))
            # the document around the cached root; its root items are replaced below
            sr = _comprehensive_sr(
                result, source_list, spec, self.device_uid, root, series_number,
                instance_number,
            )  # fmt: skip
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise DicomOutputError(
                f"study {result.study_uid}: SR could not be built: {exc}"
            ) from exc
        out = Dataset()
        out.update(sr)
        # highdicom put the cached root's own elements at the top of the document: replace
        # every one with this study's fresh copy, so no element is shared between two reports
        for element in root_items:
            out[element.tag] = element
        out.file_meta = sr.file_meta
        out.preamble = sr.preamble
        logger.debug("built SR %s for study %s (root cached)", out.SOPInstanceUID, result.study_uid)
        return out

    def _cached_root(self) -> tuple[bytes, Any]:
        """``(pickled plain root items, highdicom root)``, made on first use."""
        with self._lock:
            if self._root is None:
                self._root = _encode_root(_report_root(self.spec, self.device_uid))
            return self._root


#: The root content item's attributes, at the top level of an SR document.
_ROOT_ITEMS = (
    "ValueType",
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentTemplateSequence",
    "ContentSequence",
)


def _encode_root(root: Any) -> tuple[bytes, Any]:
    """The root's items encoded once and read back as plain datasets, pickled: their elements
    stay encoded (raw) until touched, so unpickling and writing them per study stays cheap."""
    import io
    import pickle

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    holder = Dataset()
    for keyword in _ROOT_ITEMS:
        if keyword in root:
            holder[keyword] = root[keyword]
    holder.file_meta = FileMetaDataset()
    holder.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    holder.save_as(buffer, enforce_file_format=False)
    plain = pydicom.dcmread(io.BytesIO(buffer.getvalue()), force=True)
    items = Dataset()
    for keyword in _ROOT_ITEMS:
        if keyword in plain:
            items[keyword] = plain[keyword]
    return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL), root
