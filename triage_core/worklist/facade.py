"""``Worklist``: one object per process that assembles the worklist's parts.

New code may use the parts directly (``worklist.queue``, ``worklist.leases``,
``worklist.deliveries``, ``worklist.queries``, ``worklist.ingest``, ``worklist.feedback``,
``worklist.tokens``); the methods here keep the
API that callers have used since the first release (see the package docstring).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from triage_core.errors import WorklistError
from triage_core.spec import StudyResult
from triage_core.worklist.database import Database, sqlite_url
from triage_core.worklist.deliveries import Deliveries
from triage_core.worklist.feedback import Feedback
from triage_core.worklist.ingest import Ingest
from triage_core.worklist.queries import WorklistQueries
from triage_core.worklist.queue import DeliverySpec, Leases, StudyQueue
from triage_core.worklist.records import (
    ClaimedStudy,
    DeliveryRow,
    InstanceRecord,
    Recovered,
    backoff_seconds,
)
from triage_core.worklist.retention import Retention
from triage_core.worklist.tokens import Tokens
from triage_core.worklist.wakeup import Waiter, WakeUps


def _listen_connector(db: Database) -> Callable[[], Any] | None:
    """A function opening an autocommit psycopg connection for LISTEN (PostgreSQL only)."""
    if db.dialect != "postgresql":
        return None
    import psycopg

    _args, params = db.engine.dialect.create_connect_args(db.url)
    params = {k: v for k, v in params.items() if k != "context"}  # SQLAlchemy's adapters map
    params.setdefault("application_name", "cxr-triage-listen")

    def connect() -> Any:
        return psycopg.connect(**params, autocommit=True)

    return connect


class Worklist:
    """The worklist database (see the package docstring for the whole API).

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite+pysqlite:///PATH`` (see :meth:`sqlite_url`) or
        ``postgresql+psycopg://user@host:port/db``.
    max_attempts : int
        Claims a study may use before an expired lease marks it ``failed``.
    max_delivery_attempts : int
        Failed sends after which a delivery is ``failed``.
    delivery_backoff_base, delivery_backoff_cap : float
        Default retry delay after a failed send: :func:`backoff_seconds`.
    sqlite_synchronous : str
        ``PRAGMA synchronous`` for SQLite (``FULL`` by default: committed = durable).
    busy_timeout_ms : int
        How long a SQLite writer waits for the write lock before failing.
    echo : bool
        Log SQL statements (debugging).

    Raises
    ------
    WorklistError
        For an unsupported database or invalid arguments.
    """

    sqlite_url = staticmethod(sqlite_url)

    def __init__(
        self,
        url: str,
        *,
        max_attempts: int = 3,
        max_delivery_attempts: int = 5,
        delivery_backoff_base: float = 30.0,
        delivery_backoff_cap: float = 3600.0,
        sqlite_synchronous: str = "FULL",
        busy_timeout_ms: int = 30000,
        echo: bool = False,
    ) -> None:
        if max_attempts < 1 or max_delivery_attempts < 1:
            raise WorklistError("max_attempts and max_delivery_attempts must be >= 1")
        try:
            backoff_seconds(1, delivery_backoff_base, delivery_backoff_cap)
        except ValueError as exc:
            raise WorklistError(f"delivery backoff: {exc}") from exc
        self.db = Database(
            url, sqlite_synchronous=sqlite_synchronous, busy_timeout_ms=busy_timeout_ms, echo=echo
        )
        self.dialect = self.db.dialect
        self.wakeups = WakeUps(_listen_connector(self.db))
        self.deliveries = Deliveries(
            self.db,
            self.wakeups,
            max_attempts=max_delivery_attempts,
            backoff_base=delivery_backoff_base,
            backoff_cap=delivery_backoff_cap,
        )
        self.queue = StudyQueue(self.db, self.wakeups, self.deliveries, max_attempts=max_attempts)
        self.leases = Leases(self.db, self.wakeups, max_attempts=max_attempts)
        self.ingest = Ingest(self.db, self.wakeups)
        self.queries = WorklistQueries(self.db)
        self.retention = Retention(self.db)
        self.feedback = Feedback(self.db)
        self.tokens = Tokens(self.db)
        self.max_attempts = int(max_attempts)
        self.max_delivery_attempts = int(max_delivery_attempts)
        self.delivery_backoff_base = float(delivery_backoff_base)
        self.delivery_backoff_cap = float(delivery_backoff_cap)

    # ------------------------------------------------------------------ database
    @property
    def engine(self) -> Engine:
        """The process-wide engine (shared by every call)."""
        return self.db.engine

    def create_all(self) -> None:
        """Create or upgrade the schema to the newest revision (idempotent)."""
        self.db.create_all()

    def ping(self) -> None:
        """Run ``SELECT 1``; raise :class:`WorklistError` when the database is unreachable."""
        self.db.ping()

    def dispose(self) -> None:
        """Stop the LISTEN thread and close pooled connections (call once at shutdown)."""
        self.wakeups.close()
        self.db.dispose()

    # ------------------------------------------------------------------ wake-ups
    def start_listening(self, timeout: float = 5.0) -> bool:
        """See :meth:`WakeUps.start` (PostgreSQL: LISTEN now; SQLite: nothing to do)."""
        return self.wakeups.start(timeout)

    def study_waiter(self) -> Waiter:
        """See :meth:`StudyQueue.waiter`."""
        return self.queue.waiter()

    def delivery_waiter(self) -> Waiter:
        """See :meth:`Deliveries.waiter`."""
        return self.deliveries.waiter()

    def instance_waiter(self) -> Waiter:
        """See :meth:`StudyQueue.instance_waiter`."""
        return self.queue.instance_waiter()

    # ------------------------------------------------------------------ ingest
    def record_instance(
        self,
        study_uid: str,
        sop_uid: str,
        path: str | Path,
        *,
        series_uid: str = "",
        sop_class_uid: str = "",
        accession_hash: str = "",
        now: float | None = None,
    ) -> bool:
        """See :meth:`Ingest.record_instance`."""
        return self.ingest.record_instance(
            study_uid,
            sop_uid,
            path,
            series_uid=series_uid,
            sop_class_uid=sop_class_uid,
            accession_hash=accession_hash,
            now=now,
        )

    def record_instances(
        self, records: Sequence[InstanceRecord], now: float | None = None
    ) -> list[bool]:
        """See :meth:`Ingest.record_instances`."""
        return self.ingest.record_instances(records, now=now)

    def known_instances(self, sop_uids: Sequence[str]) -> set[str]:
        """See :meth:`Ingest.known_instances`."""
        return self.ingest.known_instances(sop_uids)

    # ------------------------------------------------------------------ study queue
    def queue_stable_studies(self, stable_age: float, now: float | None = None) -> list[str]:
        """See :meth:`StudyQueue.queue_stable_studies`."""
        return self.queue.queue_stable_studies(stable_age, now=now)

    def claim_study(
        self, worker_id: str, lease_seconds: float, now: float | None = None
    ) -> ClaimedStudy | None:
        """See :meth:`StudyQueue.claim_study`."""
        return self.queue.claim_study(worker_id, lease_seconds, now=now)

    def renew_lease(
        self, study_uid: str, worker_id: str, lease_seconds: float, now: float | None = None
    ) -> float:
        """See :meth:`Leases.renew_lease`."""
        return self.leases.renew_lease(study_uid, worker_id, lease_seconds, now=now)

    def renew_leases(
        self, worker_ids: str | Sequence[str], lease_seconds: float, now: float | None = None
    ) -> list[str]:
        """See :meth:`Leases.renew_leases`."""
        return self.leases.renew_leases(worker_ids, lease_seconds, now=now)

    def complete_study(
        self,
        study_uid: str,
        worker_id: str,
        result: StudyResult,
        now: float | None = None,
        *,
        deliveries: Sequence[DeliverySpec] = (),
    ) -> str:
        """See :meth:`StudyQueue.complete_study`."""
        return self.queue.complete_study(study_uid, worker_id, result, now, deliveries=deliveries)

    def fail_study(
        self,
        study_uid: str,
        worker_id: str,
        error: str,
        *,
        retry: bool = False,
        now: float | None = None,
    ) -> str:
        """See :meth:`StudyQueue.fail_study`."""
        return self.queue.fail_study(study_uid, worker_id, error, retry=retry, now=now)

    def recover_expired_leases(self, now: float | None = None) -> Recovered:
        """See :meth:`Leases.recover_expired_leases`."""
        return self.leases.recover_expired_leases(now=now)

    # ------------------------------------------------------------------ deliveries
    def add_delivery(
        self,
        study_uid: str,
        sop_uid: str,
        path: str | Path,
        destination: str,
        now: float | None = None,
    ) -> int:
        """See :meth:`Deliveries.add`."""
        return self.deliveries.add(study_uid, sop_uid, path, destination, now=now)

    def due_deliveries(self, now: float | None = None, limit: int = 100) -> list[DeliveryRow]:
        """See :meth:`Deliveries.due`."""
        return self.deliveries.due(now=now, limit=limit)

    def claim_due_deliveries(
        self, lease_seconds: float, now: float | None = None, limit: int = 100
    ) -> list[DeliveryRow]:
        """See :meth:`Deliveries.claim_due`."""
        return self.deliveries.claim_due(lease_seconds, now=now, limit=limit)

    def mark_delivery_sent(self, delivery_id: int, now: float | None = None) -> None:
        """See :meth:`Deliveries.mark_sent`."""
        self.deliveries.mark_sent(delivery_id, now=now)

    def mark_delivery_failed(
        self,
        delivery_id: int,
        error: str,
        retry_in_seconds: float | None = None,
        *,
        permanent: bool = False,
        now: float | None = None,
    ) -> str:
        """See :meth:`Deliveries.mark_failed`."""
        return self.deliveries.mark_failed(
            delivery_id, error, retry_in_seconds, permanent=permanent, now=now
        )

    # ------------------------------------------------------------------ queries
    def counts_by_status(self) -> dict[str, int]:
        """See :meth:`WorklistQueries.counts_by_status`."""
        return self.queries.counts_by_status()

    def delivery_counts_by_status(self) -> dict[str, int]:
        """See :meth:`WorklistQueries.delivery_counts_by_status`."""
        return self.queries.delivery_counts_by_status()

    def list_worklist(
        self,
        status: str | Sequence[str] | None = None,
        min_priority: float | str | None = None,
        limit: int = 50,
        aging: Any = None,
        now: float | None = None,
    ) -> list[dict[str, Any]]:
        """See :meth:`WorklistQueries.list_worklist`."""
        return self.queries.list_worklist(status, min_priority, limit, aging, now)

    def study_detail(
        self, study_uid: str, aging: Any = None, now: float | None = None
    ) -> dict[str, Any] | None:
        """See :meth:`WorklistQueries.study_detail`."""
        return self.queries.study_detail(study_uid, aging, now)

    def purge(self, older_than_seconds: float, now: float | None = None) -> list[Path]:
        """See :meth:`Retention.purge`."""
        return self.retention.purge(older_than_seconds, now=now)
