"""STOW-RS (PS3.18 10.5): a multipart/related body of DICOM files into the C-STORE ingest path.

Each part is a PS3.10 file (preamble, ``DICM``, File Meta Information, data set). Its File Meta
group is read from the first bytes of the part (bounded: :data:`MAX_FILE_META`); the SOP Class,
SOP Instance and Transfer Syntax found there play the role of the C-STORE command, and the data
set bytes go, as they arrive, into an :class:`~dicom_node.ingest.incoming.IncomingInstance`:
the very object a C-STORE drives. So a STOW-RS instance is checked, quarantined, laid out in the
spool, grouped into its study and made durable exactly like a C-STORE one (docs/durability.md):
the answer is sent only after every stored part's file and row are durable.

:class:`StowRequest` is synchronous (file writes, fsync, the row commit) and is fed from the
request stream by the route in :mod:`dicom_node.dicomweb.router`, one thread hop per megabyte.
Limits (settings ``dicomweb_max_body``, ``dicomweb_max_part``, ``dicomweb_max_parts``) are
enforced by the parser while the body streams; an exceeded limit or a malformed body stops the
request at once (its unfinished part is dropped, never half-kept; the parts completed before it
stay stored, each durable and acknowledged in the error answer's count).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any

import multipart

from dicom_node.dicomweb.multipart import (
    MAX_HEADER_LINE,
    MAX_HEADERS,
    RelatedParser,
    parse_media_type,
)
from dicom_node.ingest.incoming import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    IncomingInstance,
)
from dicom_node.ingest.spool import StoreContext
from triage_core.uids import is_valid_uid

logger = logging.getLogger(__name__)

#: Largest File Meta Information group read from a part (it is a few hundred bytes in practice).
MAX_FILE_META = 65536
_PREAMBLE = 132
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})

#: STOW-RS Failure Reason values (PS3.18 Table I.2-1 / PS3.4 GG.4-1).
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_MISMATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
_FAILURE_OF_STATUS = {
    STATUS_OUT_OF_RESOURCES: FAILURE_OUT_OF_RESOURCES,
    STATUS_DATASET_MISMATCH: FAILURE_MISMATCH,
    STATUS_CANNOT_UNDERSTAND: FAILURE_CANNOT_UNDERSTAND,
}
#: Who sent it, in the file meta's Source AE and the logs (HTTP has no AE title).
SOURCE_AE = "DICOMWEB"


class StowBodyError(ValueError):
    """The body cannot be read on (``status``: 400 malformed, 413 over a limit)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FileMeta:
    """What a part's File Meta group says, and where its data set starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    end: int


class NeedMore(Exception):
    """The head of the part does not hold the whole File Meta group yet."""


def _text(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def parse_file_meta(head: bytes, complete: bool) -> FileMeta:
    """Read the preamble and File Meta group (PS3.10 7.1, explicit VR little endian).

    ``complete``: ``head`` is the whole part (no more bytes will come).

    Raises
    ------
    NeedMore
        More bytes are needed (and ``complete`` is false).
    ValueError
        Not a PS3.10 file, or its File Meta group lacks what we need.
    """
    if len(head) < _PREAMBLE:
        if complete:
            raise ValueError("part is shorter than the 128-byte preamble and 'DICM'")
        raise NeedMore
    if head[128:132] != b"DICM":
        raise ValueError("part is not a DICOM file (no 'DICM' after the 128-byte preamble)")
    pos = _PREAMBLE
    values: dict[int, str] = {}
    while True:
        if pos + 4 > len(head):
            if complete:
                break  # a file meta group and no data set: refused below / by the scan
            raise NeedMore
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        if pos + 8 > len(head):
            if complete:
                raise ValueError("File Meta group ends inside an element header")
            raise NeedMore
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                if complete:
                    raise ValueError("File Meta group ends inside an element header")
                raise NeedMore
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if start + length - _PREAMBLE > MAX_FILE_META:
            raise ValueError(f"File Meta group longer than {MAX_FILE_META} bytes")
        if start + length > len(head):
            if complete:
                raise ValueError("File Meta group ends inside an element value")
            raise NeedMore
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = _text(head[start : start + length])
        pos = start + length
    missing = [
        name
        for element, name in (
            (0x0002, "Media Storage SOP Class UID"),
            (0x0003, "Media Storage SOP Instance UID"),
            (0x0010, "Transfer Syntax UID"),
        )
        if not values.get(element)
    ]
    if missing:
        raise ValueError(f"File Meta group lacks {', '.join(missing)}")
    return FileMeta(values[0x0002], values[0x0003], values[0x0010], pos)


@dataclass
class PartOutcome:
    """One part's result: stored (``failure`` 0) or failed with a Failure Reason."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str = ""
    failure: int = 0
    reason: str = ""


@dataclass
class _Part:
    head: bytearray = field(default_factory=bytearray)
    instance: IncomingInstance | None = None
    skip: PartOutcome | None = None  # refused before anything was written
    size: int = 0


class StowRequest:
    """One STOW-RS request body, fed chunk by chunk (see the module docstring).

    Parameters
    ----------
    store : StoreContext
        The receive path shared with the C-STORE SCP.
    boundary : str
        The body's multipart boundary.
    study_uid : str
        Non-empty for ``POST /studies/{study}``: every instance must belong to it.
    max_body, max_part, max_parts : int
        The limits (bytes of the body, bytes of one part, number of parts).
    peer : str
        The client's address, for the log.
    """

    def __init__(
        self,
        store: StoreContext,
        boundary: str,
        *,
        study_uid: str = "",
        max_body: int,
        max_part: int,
        max_parts: int,
        peer: str = "",
    ) -> None:
        self.store = store
        self.study_uid = study_uid
        self.max_body = max_body
        self.peer = peer
        self.received = 0
        self.outcomes: list[PartOutcome] = []
        self._part: _Part | None = None
        try:
            self._parser = RelatedParser(
                boundary,
                max_header_size=MAX_HEADER_LINE,
                max_header_count=MAX_HEADERS,
                max_segment_size=max_part,
                max_segment_count=max_parts,
                strict=True,
            )
        except multipart.MultipartError as exc:
            raise StowBodyError(400, f"bad multipart boundary: {exc}") from exc

    # ------------------------------------------------------------------ feeding
    def feed(self, chunk: bytes) -> None:
        """Parse ``chunk``; each part that ends is stored (durably) before this returns."""
        self.received += len(chunk)
        if self.received > self.max_body:
            self.abort("body over the limit")
            raise StowBodyError(413, f"request body over dicomweb_max_body ({self.max_body})")
        try:
            for event in self._parser.parse(chunk):
                self._event(event)
        except multipart.ParserLimitReached as exc:
            self.abort(str(exc))
            raise StowBodyError(413, f"multipart limit reached: {exc}") from exc
        except multipart.MultipartError as exc:
            self.abort(str(exc))
            raise StowBodyError(400, f"malformed multipart/related body: {exc}") from exc

    def close(self) -> list[PartOutcome]:
        """End of the body: check it was complete; returns every part's outcome."""
        try:
            self._parser.close(check_complete=True)
        except multipart.MultipartError as exc:
            self.abort(str(exc))
            raise StowBodyError(400, f"incomplete multipart/related body: {exc}") from exc
        if not self.outcomes:
            raise StowBodyError(400, "the multipart/related body holds no part")
        return self.outcomes

    def abort(self, why: str) -> None:
        """Drop the part being received (never acknowledged: nothing of it is kept)."""
        part, self._part = self._part, None
        if part is not None and part.instance is not None:
            part.instance.discard(f"STOW-RS from {self.peer}: {why}")

    # ------------------------------------------------------------------ parts
    def _event(self, event: Any) -> None:
        if isinstance(event, multipart.MultipartSegment):
            self._part = _Part()
            declared = event.header("Content-Type", "")
            if declared:
                try:
                    kind = parse_media_type(declared).type
                except ValueError:
                    kind = "invalid"
                if kind != "application/dicom":
                    self._part.skip = PartOutcome(
                        "",
                        "",
                        "",
                        failure=FAILURE_CANNOT_UNDERSTAND,
                        reason=f"part of type {kind!r}",
                    )
        elif event is None:
            part, self._part = self._part, None
            if part is not None:
                self.outcomes.append(self._end(part))
        elif self._part is not None:
            self._data(self._part, event)

    def _data(self, part: _Part, data: bytes) -> None:
        if part.skip is not None:
            return
        if part.instance is not None:
            part.instance.write(memoryview(data))
            return
        part.head += data
        self._open(part, complete=False)

    def _open(self, part: _Part, complete: bool) -> None:
        try:
            meta = parse_file_meta(bytes(part.head), complete)
        except NeedMore:
            return
        except ValueError as exc:
            part.skip = PartOutcome("", "", "", failure=FAILURE_CANNOT_UNDERSTAND, reason=str(exc))
            part.head = bytearray()
            return
        part.instance = IncomingInstance.open(
            self.store,
            sop_class_uid=meta.sop_class_uid,
            sop_instance_uid=meta.sop_instance_uid,
            transfer_syntax=meta.transfer_syntax,
            calling_ae=SOURCE_AE,
            study_uid=self.study_uid,
        )
        rest = memoryview(part.head)[meta.end :]
        if len(rest):
            part.instance.write(rest)
        part.head = bytearray()

    def _end(self, part: _Part) -> PartOutcome:
        if part.instance is None and part.skip is None:
            self._open(part, complete=True)
        if part.skip is not None:
            logger.warning("STOW-RS from %s: part refused: %s", self.peer, part.skip.reason)
            return part.skip
        instance = part.instance
        assert instance is not None
        status = instance.finish()
        info = instance.info
        outcome = PartOutcome(
            instance.sop_class_uid if is_valid_uid(instance.sop_class_uid) else "",
            instance.sop_instance_uid if is_valid_uid(instance.sop_instance_uid) else "",
            info.study_uid if info is not None else "",
            info.series_uid if info is not None else "",
        )
        if status != STATUS_SUCCESS:
            outcome.failure = _FAILURE_OF_STATUS.get(status, FAILURE_CANNOT_UNDERSTAND)
            outcome.reason = f"C-STORE status 0x{status:04X}"
        return outcome


# ---------------------------------------------------------------------- the response
def store_response(outcomes: list[PartOutcome], base: str) -> tuple[int, dict[str, Any]]:
    """The Store Instances Response Module (PS3.18 10.5.3) as DICOM JSON, and its HTTP status.

    ``base`` is the DICOMweb root URL (``http://host:port/dicomweb``): each stored instance gets
    its Retrieve URL below it, and the response the study's when every stored part is of one.

    Returns
    -------
    tuple of (int, dict)
        200 when every part was stored, 202 when some were, 409 when none was.
    """
    referenced = [
        {
            "00081150": {"vr": "UI", "Value": [o.sop_class_uid]},
            "00081155": {"vr": "UI", "Value": [o.sop_instance_uid]},
            "00081190": {
                "vr": "UR",
                "Value": [
                    f"{base}/studies/{o.study_uid}/series/{o.series_uid}/instances/"
                    f"{o.sop_instance_uid}"
                ],
            },
        }
        for o in outcomes
        if not o.failure
    ]
    failed = []
    for o in outcomes:
        if not o.failure:
            continue
        item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [o.failure]}}
        if o.sop_class_uid:
            item["00081150"] = {"vr": "UI", "Value": [o.sop_class_uid]}
        if o.sop_instance_uid:
            item["00081155"] = {"vr": "UI", "Value": [o.sop_instance_uid]}
        failed.append(item)
    body: dict[str, Any] = {}
    studies = {o.study_uid for o in outcomes if not o.failure}
    if len(studies) == 1:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{studies.pop()}"]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 200 if not failed else (202 if referenced else 409)
    return status, body
