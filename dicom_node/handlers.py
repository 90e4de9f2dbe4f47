"""pynetdicom event handlers: association policy, C-ECHO and durable C-STORE.

Handlers run on pynetdicom's association threads and the response goes out only after they
return. So they only validate, write, record and answer; inference runs elsewhere
(:mod:`dicom_node.service`). Their dependencies come in through the 3-tuple ``evt_handlers``
form as typed objects (:class:`StoreContext`, :class:`AccessPolicy`).

The C-STORE path (:func:`handle_store`):

1. the dataset bytes are taken as received (``event.encoded_dataset``), never decoded and
   re-encoded;
2. a structural scan (:func:`scan_dataset`) walks the top-level elements to find the study,
   series and instance UIDs and to prove the stream is complete (a truncated or malformed stream
   gets 0xC210 and its bytes go to ``STORAGE/quarantine/``);
3. every UID is checked against the DICOM UID grammar before it is used in a path;
4. the file goes to ``STORAGE/spool/<study>/<series>/<sop>.dcm`` through a temporary file,
   ``fsync`` and ``rename`` (and an ``fsync`` of the folder), then the instance row is committed,
   and only then is 0x0000 returned. A repeated SOP Instance UID keeps the first copy and is
   recorded once. A full disk (or any other storage failure) answers 0xA700.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from triage_core.errors import ImageReadError, InvalidUIDError, TriageError, TruncatedFileError

if TYPE_CHECKING:
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event

    from dicom_node.metrics import Metrics
    from dicom_node.settings import AllowedPeer

logger = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_PREAMBLE = b"\x00" * 128 + b"DICM"

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

# Explicit-VR VRs with a reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = (0xFFFE, 0xE000)
_ITEM_DELIM = (0xFFFE, 0xE00D)
_SEQ_DELIM = (0xFFFE, 0xE0DD)
_MAX_DEPTH = 16

#: Single-image storage classes that must carry Pixel Data (a stream cut at an element boundary
#: otherwise looks complete): CR, DX, MG, IO (presentation and processing), SC, CT, MR, US, XA.
IMAGE_STORAGE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.2",
        "1.2.840.10008.5.1.4.1.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.1.3",
        "1.2.840.10008.5.1.4.1.1.1.3.1",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.1",
        "1.2.840.10008.5.1.4.1.1.7.2",
        "1.2.840.10008.5.1.4.1.1.7.3",
        "1.2.840.10008.5.1.4.1.1.7.4",
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.4",
        "1.2.840.10008.5.1.4.1.1.6.1",
        "1.2.840.10008.5.1.4.1.1.12.1",
    }
)

_WANTED = {
    (0x0008, 0x0016): "sop_class_uid",
    (0x0008, 0x0018): "sop_instance_uid",
    (0x0008, 0x0050): "accession_number",
    (0x0008, 0x0060): "modality",
    (0x0010, 0x0020): "patient_id",
    (0x0020, 0x000D): "study_uid",
    (0x0020, 0x000E): "series_uid",
}


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` follows the DICOM UID grammar (PS3.5 9.1): digits and dots, <= 64 chars."""
    return 0 < len(uid) <= 64 and _UID_RE.fullmatch(uid) is not None


def check_uid(uid: str, what: str) -> str:
    """Return ``uid`` or raise :class:`InvalidUIDError` (the message shows it escaped)."""
    if not is_valid_uid(uid):
        raise InvalidUIDError(f"{what} {uid[:80]!r} breaks the DICOM UID grammar")
    return uid


def phi_hash(value: str, salt: str = "") -> str:
    """A short, stable, non-reversible tag for an identifier (for logs without PHI).

    With the installation's secret ``salt`` a guessable identifier (an accession number) cannot
    be recovered by hashing candidates.
    """
    if not value:
        return "-"
    return hashlib.sha256(f"{salt}\x00{value}".encode("utf-8", "replace")).hexdigest()[:12]


@dataclass(frozen=True)
class HeaderInfo:
    """What the receive path needs from a dataset, found without decoding it."""

    study_uid: str = ""
    series_uid: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    accession_number: str = ""
    patient_id: str = ""


class _Scanner:
    """Walk a DICOM data set's elements to prove it is complete and to pick a few values."""

    def __init__(self, data: bytes | memoryview, implicit: bool, little: bool) -> None:
        self.data = memoryview(data)
        self.end = len(data)
        self.implicit = implicit
        self.prefix = "<" if little else ">"
        self.values: dict[str, str] = {}
        self.has_pixels = False

    def _need(self, pos: int, count: int, what: str) -> None:
        if pos + count > self.end:
            raise TruncatedFileError(
                "C-STORE data set",
                f"stream ends at byte {self.end} inside {what} (needs {pos + count})",
            )

    def _tag(self, pos: int) -> tuple[int, int]:
        self._need(pos, 4, "a tag")
        group, elem = struct.unpack_from(self.prefix + "HH", self.data, pos)
        return group, elem

    def walk(self, pos: int, stop: int, depth: int, implicit: bool, top: bool) -> int:
        """Walk elements from ``pos``; return the offset after the last one.

        ``stop`` is the end of a defined-length container, or -1 for an undefined-length item
        (ends at an item delimiter, whose offset after is returned).
        """
        if depth > _MAX_DEPTH:
            raise ImageReadError("C-STORE data set", f"sequences nested deeper than {_MAX_DEPTH}")
        limit = self.end if stop < 0 else stop
        last_tag = (-1, -1)
        while pos < limit:
            tag = self._tag(pos)
            if tag == _ITEM_DELIM:
                if stop >= 0:
                    raise ImageReadError(
                        "C-STORE data set", f"unexpected item delimiter at byte {pos}"
                    )
                self._need(pos, 8, "an item delimiter")
                return pos + 8
            if tag[0] == 0xFFFE:
                raise ImageReadError("C-STORE data set", f"unexpected {tag} at byte {pos}")
            if top and tag <= last_tag:
                raise ImageReadError(
                    "C-STORE data set",
                    f"element ({tag[0]:04X},{tag[1]:04X}) out of order at byte {pos}",
                )
            last_tag = tag
            vr = b""
            if implicit:
                self._need(pos, 8, "an element header")
                (length,) = struct.unpack_from(self.prefix + "I", self.data, pos + 4)
                pos += 8
            else:
                self._need(pos, 8, "an element header")
                vr = bytes(self.data[pos + 4 : pos + 6])
                if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise ImageReadError("C-STORE data set", f"invalid VR {vr!r} at byte {pos + 4}")
                if vr in _LONG_VRS:
                    self._need(pos, 12, "an element header")
                    (length,) = struct.unpack_from(self.prefix + "I", self.data, pos + 8)
                    pos += 12
                else:
                    (length,) = struct.unpack_from(self.prefix + "H", self.data, pos + 6)
                    pos += 8
            if top and tag == (0x7FE0, 0x0010):
                self.has_pixels = True
            if length == _UNDEFINED:
                if tag == (0x7FE0, 0x0010) and top:
                    pos = self._fragments(pos)
                elif implicit or vr in (b"SQ", b"UN"):
                    # UN with undefined length is an implicit-VR sequence (CP-246)
                    pos = self._sequence(pos, depth + 1, implicit or vr == b"UN")
                elif vr in (b"OB", b"OW"):
                    pos = self._fragments(pos)
                else:
                    raise ImageReadError(
                        "C-STORE data set",
                        f"undefined length for VR {vr.decode('ascii')} at byte {pos}",
                    )
                continue
            self._need(pos, length, f"element ({tag[0]:04X},{tag[1]:04X}) of {length} bytes")
            if top and tag in _WANTED:
                raw = bytes(self.data[pos : pos + length])
                self.values[_WANTED[tag]] = raw.decode("latin-1").strip("\x00 ")
            elif vr == b"SQ":
                self.walk_items(pos, pos + length, depth + 1, implicit)
            pos += length
        if stop < 0:
            raise TruncatedFileError("C-STORE data set", "stream ends before an item delimiter")
        if pos != limit:
            raise ImageReadError("C-STORE data set", f"element overruns its container at {pos}")
        return pos

    def walk_items(self, pos: int, stop: int, depth: int, implicit: bool) -> None:
        """Defined-length sequence: items up to ``stop``."""
        while pos < stop:
            tag = self._tag(pos)
            self._need(pos, 8, "an item header")
            (length,) = struct.unpack_from(self.prefix + "I", self.data, pos + 4)
            if tag != _ITEM:
                raise ImageReadError("C-STORE data set", f"expected an item at byte {pos}")
            pos += 8
            if length == _UNDEFINED:
                pos = self.walk(pos, -1, depth, implicit, False)
            else:
                self._need(pos, length, "an item")
                self.walk(pos, pos + length, depth, implicit, False)
                pos += length
        if pos != stop:
            raise ImageReadError("C-STORE data set", "sequence items overrun their sequence")

    def _sequence(self, pos: int, depth: int, implicit: bool) -> int:
        """Undefined-length sequence: items until the sequence delimiter."""
        while True:
            tag = self._tag(pos)
            self._need(pos, 8, "an item header")
            (length,) = struct.unpack_from(self.prefix + "I", self.data, pos + 4)
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM:
                raise ImageReadError("C-STORE data set", f"expected an item at byte {pos - 8}")
            if length == _UNDEFINED:
                pos = self.walk(pos, -1, depth, implicit, False)
            else:
                self._need(pos, length, "an item")
                self.walk(pos, pos + length, depth, implicit, False)
                pos += length

    def _fragments(self, pos: int) -> int:
        """Encapsulated pixel data: items (offset table, fragments) until the delimiter."""
        while True:
            tag = self._tag(pos)
            self._need(pos, 8, "a pixel data fragment header")
            (length,) = struct.unpack_from(self.prefix + "I", self.data, pos + 4)
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM or length == _UNDEFINED:
                raise ImageReadError(
                    "C-STORE data set", f"bad encapsulated pixel data item at byte {pos - 8}"
                )
            self._need(pos, length, "a pixel data fragment")
            pos += length


def scan_dataset(data: bytes | memoryview, transfer_syntax: str) -> HeaderInfo:
    """Check the structure of an encoded data set and return its identifying values.

    Only element headers are read (values are skipped by length), so a 10 MB image costs the
    same as a small one. Nested sequences are walked too.

    Raises
    ------
    TruncatedFileError
        The stream ends inside an element, an item or the encapsulated pixel data.
    ImageReadError
        Anything else that is not a well-formed data set (invalid VR, bad items, out-of-order
        top-level tags, undecompressable deflate stream).
    """
    if transfer_syntax == DEFLATED_LE:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(bytes(data)) + inflater.flush()
        except zlib.error as exc:
            raise ImageReadError("C-STORE data set", f"deflate stream is corrupt: {exc}") from exc
        if not inflater.eof:
            raise TruncatedFileError("C-STORE data set", "deflate stream ends early")
    implicit = transfer_syntax == IMPLICIT_VR_LE
    little = transfer_syntax != EXPLICIT_VR_BE
    if len(data) < 8:
        raise TruncatedFileError("C-STORE data set", f"only {len(data)} bytes")
    scanner = _Scanner(data, implicit, little)
    scanner.walk(0, len(data), 0, implicit, True)
    info = HeaderInfo(**scanner.values)
    if info.sop_class_uid in IMAGE_STORAGE_CLASSES and not scanner.has_pixels:
        raise TruncatedFileError("C-STORE data set", "image data set without Pixel Data")
    return info


class InstanceRecorder(Protocol):
    """What the C-STORE handler needs from the worklist (``triage_core.worklist.Worklist``)."""

    def record_instance(self, **kwargs: Any) -> bool: ...


_Pending = tuple[HeaderInfo, Path, int, str]


class _Ticket:
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: _Pending) -> None:
        self.item = item
        self.done = threading.Event()
        self.result = False
        self.error: BaseException | None = None


class GroupCommitter:
    """Group commit for concurrent C-STOREs: one folder fsync per folder and ONE database commit
    for every instance that is waiting, while each handler still answers only after its own
    instance is durable and recorded.

    Each handler writes and fsyncs its file and renames it (in parallel, on its association
    thread), then calls :meth:`commit`, which blocks until the committer thread has fsynced the
    folders of the whole batch and committed their rows in one transaction
    (``record_many``, e.g. :meth:`Worklist.record_instances`). With one association the batch
    is one instance and nothing is lost; with several the fsyncs and commits are shared.

    Parameters
    ----------
    record_many : callable
        ``record_many([(header, path, size, calling_ae), ...]) -> [is_new, ...]``, one
        transaction; raises a :class:`TriageError` when it cannot.
    fsync : bool
        fsync the folders (False only for throw-away benchmarks).
    max_batch : int
        Largest batch committed at once.
    """

    def __init__(
        self,
        record_many: Callable[[list[_Pending]], list[bool]],
        fsync: bool = True,
        max_batch: int = 256,
    ) -> None:
        import queue

        self._record_many = record_many
        self._fsync = fsync
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Ticket | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()
        self.batches = 0
        self.items = 0

    def commit(self, info: HeaderInfo, path: Path, size: int, calling_ae: str) -> bool:
        """Make ``path``'s folder entry durable and record the instance; ``True`` if new."""
        ticket = _Ticket((info, path, size, calling_ae))
        self._queue.put(ticket)
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def close(self) -> None:
        """Stop the committer thread after the queued tickets."""
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        import queue

        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self._max_batch:
                try:
                    ticket = self._queue.get_nowait()
                except queue.Empty:
                    break
                if ticket is None:
                    stop = True
                    break
                batch.append(ticket)
            self._commit_batch(batch)
            if stop:
                return

    def _commit_batch(self, batch: list[_Ticket]) -> None:
        try:
            if self._fsync:
                for folder in {ticket.item[1].parent for ticket in batch}:
                    _fsync_dir(folder)
            results = self._record_many([ticket.item for ticket in batch])
            self.batches += 1
            self.items += len(batch)
            for ticket, result in zip(batch, results, strict=True):
                ticket.result = result
        except (TriageError, OSError) as exc:
            for ticket in batch:
                ticket.error = exc
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting handler
            logger.exception("group commit failed")
            for ticket in batch:
                ticket.error = exc
        finally:
            for ticket in batch:
                ticket.done.set()


@dataclass
class StoreContext:
    """Dependencies of :func:`handle_store`.

    Parameters
    ----------
    storage : Path
        The storage folder (``spool/`` and ``quarantine/`` are created below it).
    record : callable
        ``record(header, path, size, calling_ae) -> bool`` commits the instance row and returns
        whether it was new; raises a :class:`TriageError` when it cannot.
    log_phi : bool
        Log accession numbers and patient IDs in clear (default: hashed).
    salt : str
        The installation's secret salt for those hashes.
    """

    storage: Path
    record: Callable[[HeaderInfo, Path, int, str], bool]
    log_phi: bool = False
    salt: str = ""
    fsync: bool = True
    metrics: Metrics | None = None
    committer: GroupCommitter | None = None
    stats: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _inflight: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.storage = self.storage.resolve()
        self.spool = self.storage / "spool"
        self.quarantine = self.storage / "quarantine"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.quarantine.mkdir(parents=True, exist_ok=True)

    def concurrent(self) -> int:
        """How many C-STOREs are being handled right now (this one included)."""
        return self._inflight

    def enter(self) -> None:
        with self._lock:
            self._inflight += 1

    def leave(self) -> None:
        with self._lock:
            self._inflight -= 1

    def count(self, key: str, reason: str = "") -> None:
        """Count an outcome (``stored``, ``duplicate``, ``rejected``, ``failed``)."""
        with self._lock:
            self.stats[key] = self.stats.get(key, 0) + 1
        if self.metrics is not None:
            if key == "stored":
                self.metrics.instances_received.inc()
            elif key in ("rejected", "failed"):
                self.metrics.instances_rejected.labels(reason=reason or key).inc()

    def describe(self, info: HeaderInfo) -> str:
        if self.log_phi:
            return f"accession={info.accession_number!r} patient={info.patient_id!r}"
        accession, patient = (
            phi_hash(v, self.salt) for v in (info.accession_number, info.patient_id)
        )
        return f"accession#={accession} patient#={patient}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path, root: Path, fsync: bool) -> None:
    """Create ``path`` (below ``root``) and fsync each parent whose entries changed."""
    if path.is_dir():
        return
    _ensure_dir(path.parent, root, fsync)
    try:
        path.mkdir()
    except FileExistsError:
        return
    if fsync:
        _fsync_dir(path.parent)


def write_durable(
    path: Path,
    chunks: Sequence[bytes | memoryview],
    root: Path,
    fsync: bool = True,
    sync_dir: bool = True,
) -> int:
    """Write ``chunks`` to ``path`` via a temporary file, fsync and rename; return the size.

    With ``sync_dir=False`` the caller fsyncs the folder afterwards (group commit).
    """
    _ensure_dir(path.parent, root, fsync)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    size = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                size += written
                view = view[written:]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync and sync_dir:
        _fsync_dir(path.parent)
    return size


def _is_inside(path: Path, root: Path) -> bool:
    """Lexical check (no symlinks are created below the spool): ``path`` stays under ``root``."""
    normal = os.path.normpath(path)
    return os.path.commonpath([normal, os.fspath(root)]) == os.fspath(root)


def quarantine(
    ctx: StoreContext, chunks: Sequence[bytes | memoryview], reason: str, calling_ae: str
) -> Path | None:
    """Keep rejected bytes under ``STORAGE/quarantine`` with a ``.txt`` reason next to them."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"{stamp}-{uuid.uuid4().hex[:12]}"
    target = ctx.quarantine / f"{name}.dcm"
    try:
        write_durable(target, chunks, ctx.storage, ctx.fsync)
        note = f"calling_ae: {calling_ae}\nreason: {reason}\n".encode("utf-8", "replace")
        write_durable(ctx.quarantine / f"{name}.txt", [note], ctx.storage, ctx.fsync)
    except OSError as exc:
        logger.error("could not quarantine rejected data (%s): %s", reason, exc)
        return None
    return target


def _calling_ae(event: Event) -> str:
    try:
        return str(event.assoc.requestor.ae_title).strip()
    except AttributeError:
        return "?"


def handle_echo(event: Event) -> int:
    """C-ECHO: always success (the association policy already admitted the peer)."""
    logger.debug("C-ECHO from %s", _calling_ae(event))
    return STATUS_SUCCESS


def handle_store(event: Event, ctx: StoreContext) -> int:
    """C-STORE: validate, write durably, record, then answer (see the module docstring)."""
    ctx.enter()
    try:
        return _store(event, ctx)
    finally:
        ctx.leave()


def _store(event: Event, ctx: StoreContext) -> int:
    started = time.perf_counter()
    calling = _calling_ae(event)
    request = cast("C_STORE", event.request)
    req_sop = str(request.AffectedSOPInstanceUID or "")
    req_class = str(request.AffectedSOPClassUID or "")
    transfer_syntax = str(event.context.transfer_syntax)
    data = event.encoded_dataset(include_meta=False)

    def reject(status: int, reason: str, chunks: Sequence[bytes | memoryview], label: str) -> int:
        ctx.count("rejected", label)
        where = quarantine(ctx, chunks, reason, calling)
        logger.warning(
            "C-STORE from %s refused with 0x%04X: %s (quarantined as %s)",
            calling,
            status,
            reason,
            where.name if where else "nothing: quarantine failed",
        )
        return status

    try:
        check_uid(req_sop, "Affected SOP Instance UID")
        check_uid(req_class, "Affected SOP Class UID")
        info = scan_dataset(data, transfer_syntax)
        check_uid(info.study_uid, "Study Instance UID")
        check_uid(info.series_uid, "Series Instance UID")
        check_uid(info.sop_instance_uid, "SOP Instance UID")
    except InvalidUIDError as exc:
        return reject(STATUS_CANNOT_UNDERSTAND, str(exc), [data], "invalid_uid")
    except ImageReadError as exc:
        return reject(STATUS_CANNOT_UNDERSTAND, str(exc), [data], "undecodable")
    if info.sop_instance_uid != req_sop or (info.sop_class_uid and info.sop_class_uid != req_class):
        return reject(
            STATUS_DATASET_MISMATCH,
            f"data set UIDs ({info.sop_class_uid}, {info.sop_instance_uid}) differ from the "
            f"request ({req_class}, {req_sop})",
            [data],
            "dataset_mismatch",
        )

    from pynetdicom.dsutils import encode_file_meta  # cheap: pynetdicom is loaded already

    meta = encode_file_meta(event.file_meta)
    path = ctx.spool / info.study_uid / info.series_uid / f"{info.sop_instance_uid}.dcm"
    if not _is_inside(path.parent, ctx.spool):  # belt and braces: grammar already excludes it
        return reject(
            STATUS_CANNOT_UNDERSTAND, "path would leave the spool folder", [data], "invalid_uid"
        )
    try:
        if path.is_file():
            # A repeat keeps the first copy (renamed in whole, so complete); it is recorded
            # again below in case the first attempt failed after the rename.
            size = path.stat().st_size
        else:
            size = write_durable(
                path,
                [_PREAMBLE, meta, data],
                ctx.storage,
                ctx.fsync,
                sync_dir=False,  # below: in this thread, or shared by the group commit
            )
    except OSError as exc:
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        ctx.count("failed", "disk_full" if full else "storage_error")
        if full:
            logger.error("C-STORE from %s: disk full writing %s: %s", calling, path.name, exc)
        else:
            logger.error("C-STORE from %s: cannot write %s: %s", calling, path.name, exc)
        return STATUS_OUT_OF_RESOURCES
    written = time.perf_counter()
    try:
        if ctx.committer is not None and ctx.concurrent() > 1:
            new = ctx.committer.commit(info, path, size, calling)
        else:  # alone: a hand-off to the committer thread would only add latency
            if ctx.fsync:
                _fsync_dir(path.parent)
            new = ctx.record(info, path, size, calling)
    except TriageError as exc:
        ctx.count("failed", "database")
        logger.error("C-STORE from %s: instance %s not recorded: %s", calling, req_sop, exc)
        return STATUS_OUT_OF_RESOURCES
    except OSError as exc:  # the folder fsync
        ctx.count("failed", "storage_error")
        logger.error("C-STORE from %s: instance %s not made durable: %s", calling, req_sop, exc)
        return STATUS_OUT_OF_RESOURCES
    ctx.count("stored" if new else "duplicate")
    logger.debug(
        "C-STORE %s study=%s sop=%s %s %d bytes ts=%s write=%.1fms record=%.1fms%s",
        calling,
        info.study_uid,
        req_sop,
        ctx.describe(info),
        size,
        transfer_syntax,
        (written - started) * 1e3,
        (time.perf_counter() - written) * 1e3,
        "" if new else " (duplicate)",
    )
    return STATUS_SUCCESS


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn Nagle's algorithm off (each small PDU otherwise waits for the delayed ACK)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # e.g. a socket already closed by the peer
        logger.debug("TCP_NODELAY not set: %s", exc)


#: Idle sleep of pynetdicom's DUL reactor between socket polls (its default is 1 ms, paid
#: several times per C-STORE); 0.1 ms measured ~40 % more small C-STOREs/s on loopback.
DUL_LOOP_DELAY = 0.0001


def _bulk_recv(assoc_socket: Any) -> Callable[[int], bytearray]:
    """A ``recv(nr_bytes)`` for pynetdicom's ``AssociationSocket`` that fills one buffer with
    ``recv_into`` instead of extending a bytearray 4 KB at a time (1,800 reads and copies for
    a 7 MB PDU stream); same contract: blocks until ``nr_bytes`` arrived, returns what was read
    when the peer closes, lets socket errors propagate."""

    def recv(nr_bytes: int) -> bytearray:
        sock = assoc_socket.socket
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = sock.recv_into(view[received:], nr_bytes - received)
            if not count:
                del view
                return buffer[:received]
            received += count
        return buffer

    return recv


def handle_conn_open(event: Event, nodelay: bool = True) -> None:
    """EVT_CONN_OPEN (acceptor and requestor): ``TCP_NODELAY``, shorter DUL poll sleep, bulk
    socket reads (pynetdicom 3.0.4 reads 4 KB per ``recv``).

    ``nodelay=False`` keeps Nagle's algorithm (only to measure what TCP_NODELAY buys).
    """
    dul = event.assoc.dul
    assoc_socket = getattr(dul, "socket", None)
    raw = getattr(assoc_socket, "socket", None)
    if nodelay:
        set_nodelay(raw)
    if hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = DUL_LOOP_DELAY
    if raw is not None and hasattr(assoc_socket, "recv") and hasattr(raw, "recv_into"):
        assoc_socket.recv = _bulk_recv(assoc_socket)  # type: ignore[union-attr]


@dataclass(frozen=True)
class AccessPolicy:
    """Which calling AEs (and hosts) may associate; an empty list admits everyone."""

    allowed: tuple[AllowedPeer, ...] = ()

    def admits(self, ae_title: str, host: str) -> bool:
        return not self.allowed or any(p.matches(ae_title, host) for p in self.allowed)


def handle_requested(event: Event, policy: AccessPolicy) -> None:
    """EVT_REQUESTED: reject a calling AE (or host) not on the allow-list.

    Answers A-ASSOCIATE-RJ, permanent, service user, "calling AE title not recognised".
    """
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    calling = str(primitive.calling_ae_title if primitive else "").strip()
    host = str(assoc.requestor.address)
    if policy.admits(calling, host):
        return
    logger.warning("association from %r at %s rejected: calling AE not allowed", calling, host)
    assoc.acse.send_reject(0x01, 0x01, 0x03)
    assoc.kill()
