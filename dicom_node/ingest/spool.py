"""The spool and its instance rows: where received instances live and how they are recorded.

``STORAGE/spool/<study>/<series>/<sop>.dcm`` holds every acknowledged instance (written as
received); ``STORAGE/spool/.incoming/`` the instances still arriving; ``STORAGE/quarantine/``
what was refused. :class:`StoreContext` is what the C-STORE path needs (folders, how to record a
row, counters, metrics); :class:`GroupCommitter` shares the folder fsyncs and the database commit
of concurrent C-STOREs; :func:`make_record_many` and :func:`make_recorder` record rows in the
worklist; :func:`installation_salt` is the secret of the identifier hashes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.ingest.durable import fsync_dir
from dicom_node.ingest.scanner import HeaderInfo
from triage_core.errors import TriageError
from triage_core.uids import hash_identifier

if TYPE_CHECKING:
    from dicom_node.metrics import Metrics
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

#: Folder below the spool for instances being received (not a UID: no study can collide).
INCOMING_DIR = ".incoming"

#: What one instance row needs: its header, its spool path, its size, the calling AE.
Pending = tuple[HeaderInfo, Path, int, str]
RecordMany = Callable[[list[Pending]], list[bool]]


class _Ticket:
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: Pending) -> None:
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
    folders of the whole batch and committed their rows in one transaction (``record_many``).
    With one association the batch is one instance; with several the fsyncs and commits are
    shared. A folder whose fsync fails fails its instances: their files are removed (the rename
    may not be durable) and the senders get 0xA700.

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

    def __init__(self, record_many: RecordMany, fsync: bool = True, max_batch: int = 256) -> None:
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

    def _sync_folders(self, batch: list[_Ticket]) -> list[_Ticket]:
        """fsync each folder once; returns the tickets whose folder is durable."""
        failed: dict[Path, OSError] = {}
        for folder in {ticket.item[1].parent for ticket in batch}:
            try:
                fsync_dir(folder)
            except OSError as exc:
                failed[folder] = exc
        durable = []
        for ticket in batch:
            path = ticket.item[1]
            error = failed.get(path.parent)
            if error is None:
                durable.append(ticket)
            else:
                path.unlink(missing_ok=True)
                ticket.error = error
        return durable

    def _commit_batch(self, batch: list[_Ticket]) -> None:
        try:
            durable = self._sync_folders(batch) if self._fsync else batch
            if durable:
                results = self._record_many([ticket.item for ticket in durable])
                self.batches += 1
                self.items += len(durable)
                for ticket, result in zip(durable, results, strict=True):
                    ticket.result = result
        except (TriageError, OSError) as exc:
            for ticket in batch:
                ticket.error = ticket.error or exc
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting handler
            logger.exception("group commit failed")
            for ticket in batch:
                ticket.error = ticket.error or exc
        finally:
            for ticket in batch:
                ticket.done.set()


@dataclass
class StoreContext:
    """What the C-STORE path (:class:`~dicom_node.ingest.incoming.IncomingInstance`) needs.

    Parameters
    ----------
    storage : Path
        The storage folder (``spool/``, ``spool/.incoming/`` and ``quarantine/`` are created
        below it).
    record : callable
        ``record(header, path, size, calling_ae) -> bool`` commits the instance row and returns
        whether it was new; raises a :class:`TriageError` when it cannot.
    log_phi : bool
        Log accession numbers and patient IDs in clear (default: salted hashes).
    salt : str
        The installation's secret salt for those hashes.
    fsync : bool
        Make files durable before answering (False only for throw-away benchmarks).
    committer : GroupCommitter, optional
        Shares folder fsyncs and commits between concurrent associations.
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
        self.incoming = self.spool / INCOMING_DIR
        self.spool.mkdir(parents=True, exist_ok=True)
        self.quarantine.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(exist_ok=True)

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
        """The instance's accession number and patient ID for a log line: salted hashes unless
        ``log_phi``."""
        if self.log_phi:
            return f"accession={info.accession_number!r} patient={info.patient_id!r}"
        accession, patient = (
            hash_identifier(v, self.salt) or "-" for v in (info.accession_number, info.patient_id)
        )
        return f"accession#={accession} patient#={patient}"


def make_record_many(worklist: Worklist, salt: str = "") -> RecordMany:
    """Record instances in the worklist, one transaction (the committer's ``record_many``)."""
    from triage_core.worklist import InstanceRecord

    def record_many(items: list[Pending]) -> list[bool]:
        return worklist.ingest.record_instances(
            [
                InstanceRecord(
                    info.study_uid,
                    info.sop_instance_uid,
                    path,
                    series_uid=info.series_uid,
                    sop_class_uid=info.sop_class_uid,
                    accession_hash=hash_identifier(info.accession_number, salt),
                )
                for info, path, _size, _calling in items
            ]
        )

    return record_many


def make_recorder(worklist: Worklist, salt: str = "") -> Callable[..., bool]:
    """The ``record`` callable of :class:`StoreContext`: one instance, one transaction."""
    record_many = make_record_many(worklist, salt)

    def record(info: HeaderInfo, path: Path, size: int, calling_ae: str) -> bool:
        return bool(record_many([(info, path, size, calling_ae)])[0])

    return record


SALT_FILE = ".identifier-salt"


def installation_salt(storage: Path) -> str:
    """The secret salt of this installation for identifier hashes, created on first use.

    It lives in the storage folder (mode 0600), so nodes sharing a storage volume hash alike.
    """
    import secrets

    path = storage / SALT_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(16) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(storage)
    return path.read_text().strip()


def spool_path(spool: Path, info: HeaderInfo) -> Path:
    """``spool/<study>/<series>/<sop>.dcm`` (UIDs already checked against the grammar)."""
    return spool / info.study_uid / info.series_uid / f"{info.sop_instance_uid}.dcm"
