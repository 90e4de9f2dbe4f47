"""The ingest side of a node: C-STORE SCP, durable spool, instance rows, recovery at start.

* the C-STORE SCP (:mod:`dicom_node.scp`) spools instances (fsync + rename) and records them in
  the worklist (:class:`~dicom_node.handlers.GroupCommitter`: one transaction for the stores
  that arrive together);
* after an unclean stop, :func:`reconcile_spool` re-records spooled instances whose rows a
  crash lost (SQLite with ``synchronous=NORMAL``; a clean stop leaves a marker).

:class:`Ingest` is the component ``triage serve`` assembles (see :mod:`dicom_node.node`); the
processing and delivery sides live in :mod:`dicom_node.processing` and
:mod:`dicom_node.delivery`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.handlers import HeaderInfo, StoreContext, write_durable

if TYPE_CHECKING:
    from dicom_node.journal import ReceiptJournal
    from dicom_node.metrics import Metrics
    from dicom_node.settings import NodeSettings
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)


def open_worklist(settings: NodeSettings) -> Worklist:
    """The worklist of ``settings`` (schema created if needed)."""
    from triage_core.worklist import Worklist

    worklist = Worklist(
        settings.database_url,
        max_attempts=settings.max_attempts,
        max_delivery_attempts=settings.delivery_max_attempts,
        delivery_backoff_base=settings.delivery_backoff,
        delivery_backoff_cap=max(settings.delivery_backoff_max, settings.delivery_backoff),
        sqlite_synchronous=settings.sqlite_synchronous,
    )
    worklist.create_all()
    return worklist


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
    return path.read_text().strip()


def make_record_many(worklist: Worklist, salt: str = "") -> Any:
    """``record_many`` of :class:`~dicom_node.handlers.GroupCommitter`: one transaction."""
    from triage_core.worklist import InstanceRecord, hash_identifier

    def record_many(items: list[tuple[HeaderInfo, Path, int, str]]) -> list[bool]:
        return worklist.record_instances(
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


#: Written at a clean stop; its absence at start means the spool must be reconciled.
CLEAN_MARKER = ".clean-shutdown"


def reconcile_spool(worklist: Worklist, spool: Path, batch: int = 1000) -> int:
    """Record every spooled instance the database does not know (after a crash).

    The spool files are fsynced before a C-STORE is answered, so they are the journal: with
    SQLite ``synchronous=NORMAL`` a power cut may lose the last committed rows, never the files.
    The path gives the UIDs (``spool/<study>/<series>/<sop>.dcm``); leftover temporary files of
    interrupted writes are deleted. Returns the number of rows added.
    """
    from dicom_node.handlers import is_valid_uid
    from triage_core.worklist import InstanceRecord

    started = time.perf_counter()
    records: list[Any] = []
    added = 0
    for study_dir in sorted(p for p in spool.iterdir() if p.is_dir()) if spool.is_dir() else []:
        for series_dir in (p for p in study_dir.iterdir() if p.is_dir()):
            for path in series_dir.iterdir():
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                    continue
                uids = (study_dir.name, series_dir.name, path.stem)
                if path.suffix != ".dcm" or not all(is_valid_uid(u) for u in uids):
                    continue
                records.append(InstanceRecord(uids[0], uids[2], path, series_uid=uids[1]))
                if len(records) >= batch:
                    added += sum(worklist.record_instances(records))
                    records = []
    if records:
        added += sum(worklist.record_instances(records))
    log = logger.warning if added else logger.info
    log(
        "spool reconciliation: %d instance(s) re-recorded in %.1f s",
        added,
        time.perf_counter() - started,
    )
    return added


def make_recorder(worklist: Worklist, salt: str = "") -> Any:
    """The ``record`` callable of :class:`StoreContext`: one instance, one transaction."""
    record_many = make_record_many(worklist, salt)

    def record(info: HeaderInfo, path: Path, size: int, calling_ae: str) -> bool:
        return bool(record_many([(info, path, size, calling_ae)])[0])

    return record


class Ingest:
    """The receive side of ``triage serve``: recovery at start, then the C-STORE SCP.

    Parameters
    ----------
    settings : NodeSettings
        ``storage``, ``spool_fsync``, ``receipt_journal``, the SCP settings.
    worklist : Worklist
        Where instances are recorded.
    metrics : Metrics
        Receive counters; the SCP's gauges are attached at start.
    """

    def __init__(self, settings: NodeSettings, worklist: Worklist, metrics: Metrics) -> None:
        self.settings = settings
        self.worklist = worklist
        self.metrics = metrics
        self.store: StoreContext | None = None
        self.journal: ReceiptJournal | None = None
        self.committer: Any = None
        self.scp: Any = None

    def start(self) -> None:
        """Recover what an unclean stop left, then open the DICOM port."""
        settings = self.settings
        self._recover_spool()
        salt = installation_salt(settings.storage)
        from dicom_node.handlers import GroupCommitter
        from dicom_node.scp import start_scp

        self.committer = GroupCommitter(
            make_record_many(self.worklist, salt), fsync=settings.spool_fsync
        )
        self.store = StoreContext(
            storage=settings.storage,
            record=make_recorder(self.worklist, salt),
            log_phi=settings.log_phi,
            salt=salt,
            metrics=self.metrics,
            fsync=settings.spool_fsync,
            committer=self.committer,
            record_many=make_record_many(self.worklist, salt),
            journal_limit=settings.journal_max_instance,
        )
        if settings.receipt_journal:
            from dicom_node.journal import ReceiptJournal

            # replays what a crash left before the port opens
            self.journal = ReceiptJournal(
                settings.storage / "journal",
                self.store.materialize,
                fsync=settings.spool_fsync,
                gather_seconds=settings.journal_batch_window,
            ).open()
            self.store.journal = self.journal
        if not settings.spool_fsync:
            logger.warning(
                "spool_fsync is OFF: a success status no longer means the instance "
                "survives a power cut (benchmarks only)"
            )
        self.scp = start_scp(settings, self.store)
        journal, server = self.journal, self.scp
        self.metrics.attach_receiver(
            lambda: float(journal.pending) if journal is not None else 0.0,
            lambda: float(len(server.active_associations)),
        )

    def stop(self, deadline: float | None = None) -> None:
        """Close the port, then commit and close what is in flight."""
        if self.scp is not None:
            self.scp.shutdown()
            self.scp = None
        if self.committer is not None:
            self.committer.close()
            self.committer = None
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    @property
    def port(self) -> int:
        return int(self.scp.server_address[1]) if self.scp is not None else 0

    def write_clean_marker(self) -> None:
        """After the worklist is closed: the next start needs no spool reconciliation."""
        if self._marker_path() is not None:
            marker = self.settings.storage / CLEAN_MARKER
            write_durable(marker, [b"clean\n"], self.settings.storage.resolve())

    def _marker_path(self) -> Path | None:
        """The clean-shutdown marker (SQLite with synchronous=NORMAL only)."""
        url = self.settings.database_url
        if not url.startswith("sqlite") or self.settings.sqlite_synchronous == "FULL":
            return None
        return self.settings.storage / CLEAN_MARKER

    def _recover_spool(self) -> None:
        """After an unclean stop, re-record spooled instances whose rows a crash lost."""
        marker = self._marker_path()
        if marker is None:
            return
        if marker.exists():
            marker.unlink()
            fd = os.open(marker.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        reconcile_spool(self.worklist, self.settings.spool_dir)
