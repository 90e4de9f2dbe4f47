"""``Worklist``: the composition root of the worklist, one object per process.

It opens one engine (:class:`~triage_core.worklist.database.Database`), builds every part on
it and exposes them; callers use the parts themselves (``worklist.queue.claim_study(...)``,
``worklist.deliveries.mark_sent(...)``, ``worklist.queries.list_worklist(...)``). What is left
here belongs to the whole: the engine and its schema, the connectivity check, the LISTEN
connection of the wake-ups, and shutdown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from triage_core.errors import WorklistError
from triage_core.worklist.database import Database, sqlite_url
from triage_core.worklist.deliveries import Deliveries
from triage_core.worklist.feedback import Feedback
from triage_core.worklist.ingest import Ingest
from triage_core.worklist.queries import WorklistQueries
from triage_core.worklist.queue import Leases, StudyQueue
from triage_core.worklist.records import backoff_seconds
from triage_core.worklist.retention import Retention
from triage_core.worklist.tokens import Tokens
from triage_core.worklist.wakeup import WakeUps


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
    """The worklist database and its parts, on one engine (see the package docstring).

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

    Attributes
    ----------
    db : Database
        The engine, transactions and tables every part shares.
    wakeups : WakeUps
        Work announcements (threading events; PostgreSQL LISTEN/NOTIFY across processes).
    ingest : Ingest
        Recording received instances.
    queue : StudyQueue
        Queue, claim, complete and fail studies; ``queue.waiter()`` and
        ``queue.instance_waiter()`` wait for work.
    leases : Leases
        Renew and recover the leases of claimed studies.
    deliveries : Deliveries
        Output objects to send, with retries; ``deliveries.waiter()``.
    queries : WorklistQueries
        The read side (CLI, HTTP API, web pages, DICOMweb catalog).
    retention : Retention
        Purging finished studies.
    feedback : Feedback
        Readers' verdicts.
    tokens : Tokens
        HTTP access tokens.

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
        self.wakeups = WakeUps(_listen_connector(self.db))
        self.ingest = Ingest(self.db, self.wakeups)
        self.deliveries = Deliveries(
            self.db,
            self.wakeups,
            max_attempts=max_delivery_attempts,
            backoff_base=delivery_backoff_base,
            backoff_cap=delivery_backoff_cap,
        )
        self.queue = StudyQueue(self.db, self.wakeups, self.deliveries, max_attempts=max_attempts)
        self.leases = Leases(self.db, self.wakeups, max_attempts=max_attempts)
        self.queries = WorklistQueries(self.db)
        self.retention = Retention(self.db)
        self.feedback = Feedback(self.db)
        self.tokens = Tokens(self.db)

    @property
    def engine(self) -> Engine:
        """The process-wide engine (shared by every part)."""
        return self.db.engine

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.db.dialect

    def create_all(self) -> None:
        """Create or upgrade the schema to the newest revision (idempotent)."""
        self.db.create_all()

    def ping(self) -> None:
        """Run ``SELECT 1``; raise :class:`WorklistError` when the database is unreachable."""
        self.db.ping()

    def start_listening(self, timeout: float = 5.0) -> bool:
        """See :meth:`WakeUps.start` (PostgreSQL: LISTEN now; SQLite: nothing to do)."""
        return self.wakeups.start(timeout)

    def dispose(self) -> None:
        """Stop the LISTEN thread and close pooled connections (call once at shutdown)."""
        self.wakeups.close()
        self.db.dispose()
