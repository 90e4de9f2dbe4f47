"""The SQL priority worklist: studies, instances, results and deliveries (DESIGN.md section 4).

One :class:`Worklist` object per process wraps one SQLAlchemy 2 engine (created once, in the
constructor, never per request); every method opens its own short transaction. SQLite (WAL mode,
the embedded default under the storage folder) and PostgreSQL (``postgresql+psycopg://...``, the
shared queue for several machines) are supported.

Public API (stable; only additions from here on)
------------------------------------------------
Construction and schema

- ``Worklist(url, *, max_attempts=3, max_delivery_attempts=5, delivery_backoff_base=30.0,
  delivery_backoff_cap=3600.0, sqlite_synchronous="FULL", busy_timeout_ms=30000, echo=False)``
- ``Worklist.sqlite_url(storage_dir) -> str``: ``sqlite+pysqlite:///<storage_dir>/worklist.sqlite3``
- ``.create_all()`` (idempotent; creates the SQLite parent folder), ``.ping()`` (``SELECT 1``,
  raises :class:`~triage_core.errors.WorklistError`), ``.dispose()``, ``.engine``, ``.dialect``

Ingest (the C-STORE hot path; one short transaction, committed before the handler answers)

- ``record_instance(study_uid, sop_uid, path, *, series_uid="", sop_class_uid="",
  accession_hash="", now=None) -> bool``: ``True`` if the instance is new; a repeated SOP Instance
  UID changes nothing and returns ``False``. A new instance for a ``done``, ``not_eligible`` or
  ``failed`` study sends it back to ``receiving`` (attempts reset); for a ``processing`` study it
  sets a re-run flag so that ``complete_study`` returns it to ``receiving`` afterwards.
- ``record_instances(records: Sequence[InstanceRecord], now=None) -> list[bool]``: the same for
  a batch in ONE transaction (one commit, one fsync).

Scheduling and workers

- ``queue_stable_studies(stable_age, now=None) -> list[str]``: ``receiving`` studies whose last
  instance arrived ``>= stable_age`` seconds ago become ``queued``.
- ``claim_study(worker_id, lease_seconds, now=None) -> ClaimedStudy | None``: the oldest
  ``queued`` study (FIFO by first arrival), now ``processing`` with a lease; ``attempts`` + 1.
  ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite.
- ``renew_lease(study_uid, worker_id, lease_seconds, now=None) -> float`` (new expiry).
- ``complete_study(study_uid, worker_id, result: StudyResult, now=None, *, deliveries=())
  -> str``: stores findings, priority, model, timings and per-image results, and registers the
  ``(sop_uid, path, destination)`` deliveries in the same transaction; status ``done`` /
  ``not_eligible`` (or ``receiving``, attempts reset, when instances arrived meanwhile);
  returns the new status.
- ``fail_study(study_uid, worker_id, error, *, retry=False, now=None) -> str``: ``failed``, or
  back to ``queued`` when ``retry`` and attempts remain.
- ``recover_expired_leases(now=None) -> Recovered``: expired ``processing`` studies go back to
  ``queued``, or to ``failed`` once ``max_attempts`` claims have been used.
  (Both lease-holding calls raise :class:`~triage_core.errors.WorklistError` when the worker no
  longer holds the lease.)

Deliveries (one row per output object and destination)

- ``add_delivery(study_uid, sop_uid, path, destination, now=None) -> int`` (id; idempotent on
  ``(sop_uid, destination)``)
- ``due_deliveries(now=None, limit=100) -> list[DeliveryRow]``: ``pending`` with
  ``next_attempt_at <= now``, oldest first.
- ``claim_due_deliveries(lease_seconds, now=None, limit=100) -> list[DeliveryRow]``: the same, but
  pushes their ``next_attempt_at`` forward by ``lease_seconds`` in the same transaction so that
  several senders never send one object twice.
- ``mark_delivery_sent(delivery_id, now=None)``
- ``mark_delivery_failed(delivery_id, error, retry_in_seconds=None, *, permanent=False,
  now=None) -> str``: attempts + 1; retried after ``retry_in_seconds`` (default: exponential
  backoff, :func:`backoff_seconds`), ``failed`` after ``max_delivery_attempts`` or when
  ``permanent``; returns the new status.
- ``backoff_seconds(attempt, base=30.0, cap=3600.0) -> float``: ``min(cap, base * 2**(attempt-1))``

Queries (JSON-ready dicts; timestamps are ISO 8601 UTC strings)

- ``list_worklist(status=None, min_priority=None, limit=50, aging=None, now=None) -> list[dict]``
  ordered by effective priority (score plus aging, highest first; unscored studies last) then
  arrival. Row keys: ``study_uid``, ``status``, ``reason``, ``error``, ``priority_score``,
  ``effective_priority``, ``priority_level``, ``findings`` ({name: {probability, present}}),
  ``model_name``, ``model_version``, ``num_instances``, ``received_at``, ``updated_at``,
  ``accession_hash``.
- ``study_detail(study_uid, aging=None, now=None) -> dict | None``: a row plus ``findings`` with
  threshold and source image, ``images`` (per-instance results), ``deliveries``, ``timings``,
  ``attempts``, ``lease_owner``, ``lease_expires_at``. Spool paths are never exposed.
- ``counts_by_status() -> dict[str, int]`` (every status, zeros included),
  ``delivery_counts_by_status() -> dict[str, int]``.
- ``purge(older_than_seconds, now=None) -> list[Path]``: deletes finished studies (``done``,
  ``not_eligible``, ``failed``, no pending delivery) last updated before the cut-off and returns
  the spool and outbox paths the caller should delete.

Helpers: ``SCHEMA_VERSION`` (kept in table ``worklist_meta``; ``create_all`` refuses another
version), ``STUDY_STATUSES``, ``DELIVERY_STATUSES``, ``InstanceRecord``, ``ClaimedStudy``,
``DeliveryRow``, ``Recovered``, and re-exported from :mod:`triage_core.uids`:
``is_valid_uid``, ``hash_identifier``.

Time is stored as float seconds since the epoch (UTC); every method takes an optional ``now``
so that tests and replays are deterministic.

SQLite notes: WAL journal, ``synchronous=FULL`` by default (the C-STORE handler answers success
only after the instance row is committed, so a committed row must survive a power cut; use
``record_instances`` to batch commits), ``busy_timeout``, ``foreign_keys=ON``. Every writing
transaction starts with ``BEGIN IMMEDIATE`` (serialised writers, no lock upgrade deadlocks),
reads use a plain deferred ``BEGIN`` and never block writers in WAL mode.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from triage_core.errors import WorklistError
from triage_core.spec import PRIORITY_LEVELS, StudyResult
from triage_core.uids import check_uid
from triage_core.uids import hash_identifier as hash_identifier
from triage_core.uids import is_valid_uid as is_valid_uid

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine, MetaData, Table

logger = logging.getLogger(__name__)

#: Study lifecycle states (DESIGN.md section 4).
STUDY_STATUSES: tuple[str, ...] = (
    "receiving",
    "queued",
    "processing",
    "done",
    "not_eligible",
    "failed",
)
#: Delivery states.
DELIVERY_STATUSES: tuple[str, ...] = ("pending", "sent", "failed")
#: Statuses after which a new instance re-opens the study.
_REOPEN_STATUSES: tuple[str, ...] = ("done", "not_eligible", "failed")
_FINISHED_STATUSES: tuple[str, ...] = ("done", "not_eligible", "failed")

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
#: Version of the table layout, stored in ``worklist_meta``; bump with every schema change.
SCHEMA_VERSION = 1
_PG_SCHEMA_LOCK = 0x43585254  # advisory lock key serialising create_all across processes


def _check_uid(name: str, uid: str) -> None:
    check_uid(uid, name)


def backoff_seconds(attempt: int, base: float = 30.0, cap: float = 3600.0) -> float:
    """Exponential backoff before retry number ``attempt`` (1-based): ``min(cap, base*2**(n-1))``.

    Parameters
    ----------
    attempt : int
        How many attempts have failed so far (>= 1; smaller values count as 1).
    base : float
        Delay after the first failure, in seconds (> 0).
    cap : float
        Largest delay, in seconds (>= base).

    Raises
    ------
    ValueError
        If ``base`` is not positive or ``cap < base``.
    """
    if not base > 0 or not cap >= base:
        raise ValueError(f"need 0 < base <= cap, got base={base!r}, cap={cap!r}")
    exponent = max(0, int(attempt) - 1)
    if exponent >= 63:
        return float(cap)
    return float(min(cap, base * (2**exponent)))


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, for :meth:`Worklist.record_instances`."""

    study_uid: str
    sop_uid: str
    path: str | Path
    series_uid: str = ""
    sop_class_uid: str = ""
    accession_hash: str = ""


@dataclass(frozen=True)
class ClaimedStudy:
    """A study a worker now holds a lease on.

    ``instances`` are ``(sop_instance_uid, path)`` pairs in arrival order, the input of
    ``triage_core.pipeline.triage_study``.
    """

    study_uid: str
    worker_id: str
    attempts: int
    lease_expires_at: float
    instances: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class DeliveryRow:
    """One output object to send to one destination."""

    id: int
    study_uid: str
    sop_uid: str
    path: Path
    destination: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str


@dataclass(frozen=True)
class Recovered:
    """What :meth:`Worklist.recover_expired_leases` did."""

    requeued: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


def _build_metadata() -> tuple[MetaData, dict[str, Table]]:
    from sqlalchemy import (
        Boolean,
        Column,
        Double,
        ForeignKey,
        Index,
        Integer,
        MetaData,
        String,
        Table,
        Text,
        UniqueConstraint,
    )

    md = MetaData()
    studies = Table(
        "studies",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("study_uid", String(64), nullable=False, unique=True),
        Column("status", String(16), nullable=False, default="receiving"),
        Column("reason", Text, nullable=False, default=""),
        Column("error", Text, nullable=False, default=""),
        Column("accession_hash", String(64), nullable=False, default=""),
        Column("received_at", Double, nullable=False),
        Column("last_instance_at", Double, nullable=False),
        Column("queued_at", Double, nullable=True),
        Column("updated_at", Double, nullable=False),
        Column("completed_at", Double, nullable=True),
        Column("attempts", Integer, nullable=False, default=0),
        Column("lease_owner", String(128), nullable=True),
        Column("lease_expires_at", Double, nullable=True),
        Column("rerun", Boolean, nullable=False, default=False),
        Column("priority_score", Double, nullable=True),
        Column("priority_level", String(16), nullable=True),
        Column("model_name", String(128), nullable=False, default=""),
        Column("model_version", String(64), nullable=False, default=""),
        Column("timings", Text, nullable=False, default="{}"),
        Index("ix_studies_status_received", "status", "received_at"),
        Index("ix_studies_status_lease", "status", "lease_expires_at"),
    )
    instances = Table(
        "instances",
        md,
        Column("sop_uid", String(64), primary_key=True),
        Column(
            "study_uid",
            String(64),
            ForeignKey("studies.study_uid", ondelete="CASCADE"),
            nullable=False,
        ),
        Column("series_uid", String(64), nullable=False, default=""),
        Column("sop_class_uid", String(64), nullable=False, default=""),
        Column("path", Text, nullable=False),
        Column("received_at", Double, nullable=False),
        Index("ix_instances_study", "study_uid"),
    )
    results = Table(
        "results",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column(
            "study_uid",
            String(64),
            ForeignKey("studies.study_uid", ondelete="CASCADE"),
            nullable=False,
        ),
        Column("finding", String(64), nullable=False),
        Column("probability", Double, nullable=False),
        Column("present", Boolean, nullable=False),
        Column("threshold", Double, nullable=False),
        Column("source_uid", String(256), nullable=False, default=""),
        UniqueConstraint("study_uid", "finding", name="uq_results_study_finding"),
    )
    image_results = Table(
        "image_results",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column(
            "study_uid",
            String(64),
            ForeignKey("studies.study_uid", ondelete="CASCADE"),
            nullable=False,
        ),
        Column("uid", String(256), nullable=False),
        Column("eligible", Boolean, nullable=False),
        Column("reason", Text, nullable=False, default=""),
        Column("probabilities", Text, nullable=False, default="{}"),
        Column("error", Text, nullable=False, default=""),
        UniqueConstraint("study_uid", "uid", name="uq_image_results_study_uid"),
    )
    deliveries = Table(
        "deliveries",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column(
            "study_uid",
            String(64),
            ForeignKey("studies.study_uid", ondelete="CASCADE"),
            nullable=False,
        ),
        Column("sop_uid", String(64), nullable=False),
        Column("path", Text, nullable=False),
        Column("destination", String(256), nullable=False),
        Column("status", String(16), nullable=False, default="pending"),
        Column("attempts", Integer, nullable=False, default=0),
        Column("next_attempt_at", Double, nullable=False),
        Column("last_error", Text, nullable=False, default=""),
        Column("created_at", Double, nullable=False),
        Column("updated_at", Double, nullable=False),
        Column("sent_at", Double, nullable=True),
        UniqueConstraint("sop_uid", "destination", name="uq_deliveries_sop_destination"),
        Index("ix_deliveries_status_next", "status", "next_attempt_at"),
        Index("ix_deliveries_study", "study_uid"),
    )
    meta = Table(
        "worklist_meta",
        md,
        Column("key", String(64), primary_key=True),
        Column("value", Text, nullable=False),
    )
    tables = {
        "worklist_meta": meta,
        "studies": studies,
        "instances": instances,
        "results": results,
        "image_results": image_results,
        "deliveries": deliveries,
    }
    return md, tables


AgingFunction = Callable[[float, float], float]


def _aging_function(aging: Any) -> AgingFunction | None:
    """Turn ``aging`` (None, an ``AgingRule`` or a callable) into ``f(score, waited) -> float``."""
    if aging is None:
        return None
    if callable(aging):
        fn: AgingFunction = aging
        return fn
    from triage_core.priority import effective_priority

    def apply(score: float, waited: float) -> float:
        return float(effective_priority(score, waited, rule=aging))

    return apply


class Worklist:
    """The worklist database (see the module docstring for the whole API).

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
        from sqlalchemy import create_engine, event
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        if max_attempts < 1 or max_delivery_attempts < 1:
            raise WorklistError("max_attempts and max_delivery_attempts must be >= 1")
        try:
            backoff_seconds(1, delivery_backoff_base, delivery_backoff_cap)
        except ValueError as exc:
            raise WorklistError(f"delivery backoff: {exc}") from exc
        sync = sqlite_synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise WorklistError(f"sqlite_synchronous must be one of {_SYNCHRONOUS}, got {sync!r}")
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise WorklistError(f"invalid database URL {url!r}: {exc}") from exc
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise WorklistError(
                f"unsupported database {backend!r} in {parsed.render_as_string(True)}: "
                "use sqlite+pysqlite:///PATH or postgresql+psycopg://..."
            )
        if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
            raise WorklistError("an in-memory SQLite database cannot be shared: give a file path")
        self.max_attempts = int(max_attempts)
        self.max_delivery_attempts = int(max_delivery_attempts)
        self.delivery_backoff_base = float(delivery_backoff_base)
        self.delivery_backoff_cap = float(delivery_backoff_cap)
        self._url = parsed
        self.dialect = backend
        connect_args: dict[str, Any] = {}
        if backend == "sqlite":
            connect_args = {"timeout": busy_timeout_ms / 1000.0, "check_same_thread": False}
        self._engine: Engine = create_engine(
            parsed, echo=echo, pool_pre_ping=backend != "sqlite", connect_args=connect_args
        )
        if backend == "sqlite":
            self._install_sqlite_events(event, sync, int(busy_timeout_ms))
        self._metadata, self._tables = _build_metadata()
        logger.info("worklist database: %s", parsed.render_as_string(hide_password=True))

    # ------------------------------------------------------------------ setup
    def _install_sqlite_events(self, event: Any, synchronous: str, busy_timeout_ms: int) -> None:
        engine = self._engine

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's own transaction
            # handling would defer it and cannot do BEGIN IMMEDIATE).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
                mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
                if mode is None or str(mode[0]).lower() != "wal":
                    logger.warning("SQLite refused WAL journal mode (got %r)", mode)
                cursor.execute(f"PRAGMA synchronous = {synchronous}")
                cursor.execute("PRAGMA foreign_keys = ON")
            finally:
                cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

    @staticmethod
    def sqlite_url(storage_dir: str | Path) -> str:
        """The URL of the embedded SQLite worklist under ``storage_dir``."""
        path = Path(storage_dir).expanduser().resolve() / "worklist.sqlite3"
        return f"sqlite+pysqlite:///{path}"

    @property
    def engine(self) -> Engine:
        """The process-wide engine (shared by every call)."""
        return self._engine

    def create_all(self) -> None:
        """Create missing tables and indexes (and the SQLite parent folder)."""
        from sqlalchemy.exc import SQLAlchemyError

        if self.dialect == "sqlite" and self._url.database:
            Path(self._url.database).parent.mkdir(parents=True, exist_ok=True)
        from sqlalchemy import select, text

        meta = self._tables["worklist_meta"]
        try:
            with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
                with conn.begin():
                    if self.dialect == "postgresql":
                        # several serve/worker processes may start at once
                        conn.execute(text(f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK})"))
                    self._metadata.create_all(conn)
                    found = conn.execute(
                        select(meta.c.value).where(meta.c.key == "schema_version")
                    ).scalar()
                    if found is None:
                        conn.execute(
                            meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
                        )
        except SQLAlchemyError as exc:
            raise WorklistError(f"cannot create the worklist tables: {exc}") from exc
        if found is not None and found != str(SCHEMA_VERSION):
            raise WorklistError(
                f"the worklist database has schema version {found}, this code uses "
                f"{SCHEMA_VERSION}: use a new database (or --db) or the matching cxr-triage"
            )

    def ping(self) -> None:
        """Run ``SELECT 1``; raise :class:`WorklistError` when the database is unreachable."""
        from sqlalchemy import text

        with self._read() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        """Close pooled connections (call once at shutdown)."""
        self._engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with self._engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise WorklistError(f"worklist write failed: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            with self._engine.connect() as conn:
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise WorklistError(f"worklist query failed: {exc}") from exc

    def _insert(self, table: Table) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    # ------------------------------------------------------------------ ingest
    def _ingest_statements(self) -> tuple[Any, Any, Any]:
        """The three statements of :meth:`record_instances`, built once with bound parameters.

        Building a statement per call (``insert(...).values(...)``) costs more than running
        it; these run as ``executemany`` over a whole batch (which instances are new is read
        first, in the same transaction).
        """
        cached = getattr(self, "_ingest_cache", None)
        if cached is not None:
            return cast("tuple[Any, Any, Any]", cached)
        from sqlalchemy import bindparam, case, literal, or_, update

        studies = self._tables["studies"]
        instances = self._tables["instances"]
        ts: Any = bindparam("ts")
        add_study = (
            self._insert(studies)
            .values(
                study_uid=bindparam("study_uid"),
                status="receiving",
                reason="",
                error="",
                accession_hash=bindparam("accession_hash"),
                received_at=ts,
                last_instance_at=ts,
                updated_at=ts,
                attempts=0,
                rerun=False,
                model_name="",
                model_version="",
                timings="{}",
            )
            .on_conflict_do_nothing(index_elements=["study_uid"])
        )
        add_instance = (
            self._insert(instances)
            .values(
                sop_uid=bindparam("sop_uid"),
                study_uid=bindparam("study_uid"),
                series_uid=bindparam("series_uid"),
                sop_class_uid=bindparam("sop_class_uid"),
                path=bindparam("path"),
                received_at=ts,
            )
            .on_conflict_do_nothing(index_elements=["sop_uid"])
        )
        status = studies.c.status
        # OR of equalities, not IN: an expanding IN cannot run as executemany
        reopen = or_(*(status == value for value in _REOPEN_STATUSES))
        accession: Any = bindparam("accession_hash")
        touch_study = (
            update(studies)
            .where(studies.c.study_uid == bindparam("key"))
            .values(
                last_instance_at=ts,
                updated_at=ts,
                status=case((reopen, "receiving"), else_=status),
                attempts=case((reopen, 0), else_=studies.c.attempts),
                rerun=case((status == "processing", True), else_=studies.c.rerun),
                # an accession hash fills an empty one, never replaces a known one
                accession_hash=case(
                    ((studies.c.accession_hash == "") & (accession != literal("")), accession),
                    else_=studies.c.accession_hash,
                ),
            )
        )
        self._ingest_cache = (add_study, add_instance, touch_study)
        return self._ingest_cache

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
        """Record one received instance (idempotent on the SOP Instance UID).

        Parameters
        ----------
        study_uid, sop_uid : str
            Study and SOP Instance UIDs (checked against the UID grammar).
        path : str or Path
            Where the instance is spooled.
        series_uid, sop_class_uid : str
            Optional, for display and eligibility summaries.
        accession_hash : str
            A hash of the accession number (see :func:`hash_identifier`), never the number.
        now : float, optional
            Arrival time (epoch seconds); defaults to the current time.

        Returns
        -------
        bool
            ``True`` if the instance was new, ``False`` for a repeat.

        Raises
        ------
        InvalidUIDError
            For a UID that breaks the grammar.
        WorklistError
            When the database refuses the write.
        """
        record = InstanceRecord(study_uid, sop_uid, path, series_uid, sop_class_uid, accession_hash)
        return self.record_instances([record], now=now)[0]

    def record_instances(
        self, records: Sequence[InstanceRecord], now: float | None = None
    ) -> list[bool]:
        """Record several instances in one transaction (one commit); see :meth:`record_instance`.

        Returns
        -------
        list of bool
            Per record, whether it was new (a SOP UID repeated inside the batch is new once).
        """
        for rec in records:
            _check_uid("Study Instance UID", rec.study_uid)
            _check_uid("SOP Instance UID", rec.sop_uid)
            if rec.series_uid:
                _check_uid("Series Instance UID", rec.series_uid)
        if not records:
            return []
        ts = time.time() if now is None else float(now)
        add_study, add_instance, touch_study = self._ingest_statements()
        from sqlalchemy import select

        instances = self._tables["instances"]
        out = [False] * len(records)
        # Rows are locked in one global order (study, then SOP UID) so that two concurrent
        # batches on PostgreSQL cannot deadlock on each other's study rows.
        order = sorted(
            range(len(records)), key=lambda k: (records[k].study_uid, records[k].sop_uid)
        )
        with self._write() as conn:
            known = set(
                conn.execute(
                    select(instances.c.sop_uid).where(
                        instances.c.sop_uid.in_({rec.sop_uid for rec in records})
                    )
                ).scalars()
            )
            fresh: list[InstanceRecord] = []
            accession: dict[str, str] = {}
            for index in order:
                rec = records[index]
                if rec.sop_uid in known:
                    logger.debug("instance %s already recorded", rec.sop_uid)
                    continue
                known.add(rec.sop_uid)  # a repeat inside the batch is new once
                out[index] = True
                fresh.append(rec)
                if rec.accession_hash or rec.study_uid not in accession:
                    accession.setdefault(rec.study_uid, "")
                    accession[rec.study_uid] = accession[rec.study_uid] or rec.accession_hash
            if fresh:
                # executemany: one round of statements per batch, not per instance
                conn.execute(
                    add_study,
                    [{"study_uid": u, "accession_hash": h, "ts": ts} for u, h in accession.items()],
                )
                conn.execute(
                    add_instance,
                    [
                        {
                            "sop_uid": rec.sop_uid,
                            "study_uid": rec.study_uid,
                            "series_uid": rec.series_uid,
                            "sop_class_uid": rec.sop_class_uid,
                            "path": str(rec.path),
                            "ts": ts,
                        }
                        for rec in fresh
                    ],
                )
                conn.execute(
                    touch_study,
                    [{"key": u, "accession_hash": h, "ts": ts} for u, h in accession.items()],
                )
        return out

    # ------------------------------------------------------------------ scheduling
    def queue_stable_studies(self, stable_age: float, now: float | None = None) -> list[str]:
        """Queue ``receiving`` studies whose last instance arrived ``>= stable_age`` s ago.

        Returns
        -------
        list of str
            The Study Instance UIDs queued by this call.
        """
        from sqlalchemy import select, update

        ts = time.time() if now is None else float(now)
        studies = self._tables["studies"]
        cutoff = ts - float(stable_age)
        with self._write() as conn:
            uids = [
                row[0]
                for row in conn.execute(
                    select(studies.c.study_uid)
                    .where(studies.c.status == "receiving", studies.c.last_instance_at <= cutoff)
                    .order_by(studies.c.received_at, studies.c.id)
                    .with_for_update(skip_locked=True)
                )
            ]
            if uids:
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid.in_(uids), studies.c.status == "receiving")
                    .values(status="queued", queued_at=ts, updated_at=ts)
                )
        if uids:
            logger.info("queued %d stable studies", len(uids))
        return uids

    def claim_study(
        self, worker_id: str, lease_seconds: float, now: float | None = None
    ) -> ClaimedStudy | None:
        """Claim the oldest queued study (FIFO by first arrival) with a lease.

        Parameters
        ----------
        worker_id : str
            Unique name of the claiming worker (e.g. ``host:pid:thread``).
        lease_seconds : float
            How long the lease lasts unless renewed.
        now : float, optional
            Current time (epoch seconds).

        Returns
        -------
        ClaimedStudy or None
            ``None`` when nothing is queued.
        """
        from sqlalchemy import select, update

        if not worker_id:
            raise WorklistError("worker_id must not be empty")
        if not lease_seconds > 0:
            raise WorklistError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        ts = time.time() if now is None else float(now)
        studies = self._tables["studies"]
        instances = self._tables["instances"]
        with self._write() as conn:
            row = conn.execute(
                select(studies.c.study_uid, studies.c.attempts)
                .where(studies.c.status == "queued")
                .order_by(studies.c.received_at, studies.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            study_uid, attempts = str(row[0]), int(row[1]) + 1
            expires = ts + float(lease_seconds)
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(
                    status="processing",
                    attempts=attempts,
                    lease_owner=worker_id,
                    lease_expires_at=expires,
                    rerun=False,
                    updated_at=ts,
                )
            )
            inst = conn.execute(
                select(instances.c.sop_uid, instances.c.path)
                .where(instances.c.study_uid == study_uid)
                .order_by(instances.c.received_at, instances.c.sop_uid)
            ).all()
        logger.info("worker %s claimed study %s (attempt %d)", worker_id, study_uid, attempts)
        return ClaimedStudy(
            study_uid=study_uid,
            worker_id=worker_id,
            attempts=attempts,
            lease_expires_at=expires,
            instances=tuple((str(uid), Path(p)) for uid, p in inst),
        )

    def _held(self, conn: Connection, study_uid: str, worker_id: str) -> Any:
        from sqlalchemy import select

        studies = self._tables["studies"]
        row = conn.execute(
            select(studies.c.status, studies.c.lease_owner, studies.c.attempts, studies.c.rerun)
            .where(studies.c.study_uid == study_uid)
            .with_for_update()
        ).first()
        if row is None:
            raise WorklistError(f"unknown study {study_uid}")
        if row.status != "processing" or row.lease_owner != worker_id:
            raise WorklistError(
                f"worker {worker_id} no longer holds the lease on study {study_uid} "
                f"(status {row.status}, owner {row.lease_owner})"
            )
        return row

    def renew_lease(
        self, study_uid: str, worker_id: str, lease_seconds: float, now: float | None = None
    ) -> float:
        """Extend a held lease to ``now + lease_seconds``; returns the new expiry.

        Raises
        ------
        WorklistError
            If ``worker_id`` no longer holds the lease.
        """
        from sqlalchemy import update

        ts = time.time() if now is None else float(now)
        studies = self._tables["studies"]
        expires = ts + float(lease_seconds)
        with self._write() as conn:
            self._held(conn, study_uid, worker_id)
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(lease_expires_at=expires, updated_at=ts)
            )
        return expires

    def complete_study(
        self,
        study_uid: str,
        worker_id: str,
        result: StudyResult,
        now: float | None = None,
        *,
        deliveries: Sequence[tuple[str, str | Path, str]] = (),
    ) -> str:
        """Store a study's result and finish it.

        Findings (probability, present, threshold, source image), priority score and level,
        model name and version, timings and per-image results replace any earlier result.

        Parameters
        ----------
        study_uid, worker_id : str
            The study and the worker holding its lease.
        result : StudyResult
            What the pipeline found (``status`` ``done`` or ``not_eligible``).
        now : float, optional
            Current time (epoch seconds).
        deliveries : sequence of (sop_uid, path, destination)
            Output objects to send, registered in the SAME transaction (as :meth:`add_delivery`
            would, idempotent on ``(sop_uid, destination)``): either the result and its
            deliveries are stored, or neither is (e.g. when the lease was lost meanwhile).

        Returns
        -------
        str
            The new status: ``result.status`` (``done`` or ``not_eligible``), or ``receiving``
            when new instances arrived while the study was being processed.

        Raises
        ------
        WorklistError
            If the worker no longer holds the lease, or the result is inconsistent.
        """
        from sqlalchemy import delete, update

        if result.study_uid != study_uid:
            raise WorklistError(f"result is for study {result.study_uid}, not {study_uid}")
        if result.status not in ("done", "not_eligible"):
            raise WorklistError(
                f"result status must be 'done' or 'not_eligible', got {result.status!r}"
            )
        score = float(result.priority_score)
        if not math.isfinite(score):
            raise WorklistError(f"priority score must be finite, got {score!r}")
        names = [f.name for f in result.findings]
        if len(set(names)) != len(names):
            raise WorklistError(f"result repeats a finding: {names}")
        uids = [img.uid for img in result.images]
        if len(set(uids)) != len(uids):
            raise WorklistError("result repeats an image UID")
        for sop_uid, _path, destination in deliveries:
            _check_uid("SOP Instance UID", sop_uid)
            if not destination:
                raise WorklistError("delivery destination must not be empty")
        finding_rows = []
        for f in result.findings:
            if not math.isfinite(float(f.probability)):
                raise WorklistError(f"finding {f.name}: probability {f.probability!r}")
            finding_rows.append(
                {
                    "study_uid": study_uid,
                    "finding": f.name,
                    "probability": float(f.probability),
                    "present": bool(f.present),
                    "threshold": float(f.threshold),
                    "source_uid": f.source_uid,
                }
            )
        image_rows = [
            {
                "study_uid": study_uid,
                "uid": img.uid,
                "eligible": bool(img.eligible),
                "reason": img.reason,
                "probabilities": json.dumps({k: float(v) for k, v in img.probabilities.items()}),
                "error": img.error,
            }
            for img in result.images
        ]
        timings = json.dumps({k: float(v) for k, v in result.timings.items()})
        ts = time.time() if now is None else float(now)
        studies = self._tables["studies"]
        with self._write() as conn:
            held = self._held(conn, study_uid, worker_id)
            new_status = "receiving" if held.rerun else result.status
            for name in ("results", "image_results"):
                table = self._tables[name]
                conn.execute(delete(table).where(table.c.study_uid == study_uid))
            if finding_rows:
                conn.execute(self._tables["results"].insert(), finding_rows)
            if image_rows:
                conn.execute(self._tables["image_results"].insert(), image_rows)
            for sop_uid, path, destination in deliveries:
                self._insert_delivery(conn, study_uid, sop_uid, path, destination, ts)
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(
                    status=new_status,
                    attempts=0 if held.rerun else held.attempts,
                    reason=result.reason,
                    error="",
                    priority_score=score,
                    priority_level=result.priority_level,
                    model_name=result.model_name,
                    model_version=result.model_version,
                    timings=timings,
                    lease_owner=None,
                    lease_expires_at=None,
                    rerun=False,
                    completed_at=ts,
                    updated_at=ts,
                )
            )
        logger.info(
            "study %s %s (priority %.1f %s)",
            study_uid,
            new_status,
            score,
            result.priority_level,
        )
        return new_status

    def fail_study(
        self,
        study_uid: str,
        worker_id: str,
        error: str,
        *,
        retry: bool = False,
        now: float | None = None,
    ) -> str:
        """Record a processing error.

        Parameters
        ----------
        retry : bool
            Put the study back in the queue when it has claims left (a transient error);
            otherwise it becomes ``failed`` at once.

        Returns
        -------
        str
            The new status (``failed``, ``queued`` or ``receiving`` if instances arrived).

        Raises
        ------
        WorklistError
            If the worker no longer holds the lease.
        """
        from sqlalchemy import update

        ts = time.time() if now is None else float(now)
        studies = self._tables["studies"]
        with self._write() as conn:
            held = self._held(conn, study_uid, worker_id)
            if held.rerun:
                status = "receiving"
            elif retry and int(held.attempts) < self.max_attempts:
                status = "queued"
            else:
                status = "failed"
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(
                    status=status,
                    attempts=0 if held.rerun else held.attempts,
                    error=str(error),
                    lease_owner=None,
                    lease_expires_at=None,
                    rerun=False,
                    updated_at=ts,
                )
            )
        logger.warning("study %s: %s -> %s", study_uid, error, status)
        return status

    def recover_expired_leases(self, now: float | None = None) -> Recovered:
        """Return studies whose lease expired to ``queued`` (or ``failed`` after max_attempts)."""
        from sqlalchemy import select, update

        ts = time.time() if now is None else float(now)
        studies = self._tables["studies"]
        requeued: list[str] = []
        failed: list[str] = []
        with self._write() as conn:
            rows = conn.execute(
                select(studies.c.study_uid, studies.c.attempts, studies.c.lease_owner)
                .where(studies.c.status == "processing", studies.c.lease_expires_at < ts)
                .with_for_update(skip_locked=True)
            ).all()
            for uid, attempts, owner in rows:
                if int(attempts) >= self.max_attempts:
                    failed.append(uid)
                    values: dict[str, Any] = {
                        "status": "failed",
                        "error": f"lease of worker {owner} expired after {attempts} attempts",
                    }
                else:
                    requeued.append(uid)
                    values = {"status": "queued", "queued_at": ts}
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid == uid)
                    .values(lease_owner=None, lease_expires_at=None, updated_at=ts, **values)
                )
        for uid in requeued:
            logger.warning("lease on study %s expired: queued again", uid)
        for uid in failed:
            logger.error("lease on study %s expired too often: failed", uid)
        return Recovered(tuple(requeued), tuple(failed))

    # ------------------------------------------------------------------ deliveries
    def add_delivery(
        self,
        study_uid: str,
        sop_uid: str,
        path: str | Path,
        destination: str,
        now: float | None = None,
    ) -> int:
        """Register an output object to send to ``destination`` (e.g. ``AE@host:port``).

        Idempotent on ``(sop_uid, destination)``: a repeat returns the existing id.
        """

        _check_uid("SOP Instance UID", sop_uid)
        if not destination:
            raise WorklistError("destination must not be empty")
        ts = time.time() if now is None else float(now)
        with self._write() as conn:
            delivery_id = self._insert_delivery(conn, study_uid, sop_uid, path, destination, ts)
        return int(delivery_id)

    def _insert_delivery(
        self,
        conn: Connection,
        study_uid: str,
        sop_uid: str,
        path: str | Path,
        destination: str,
        ts: float,
    ) -> int:
        from sqlalchemy import select

        deliveries = self._tables["deliveries"]
        conn.execute(
            self._insert(deliveries)
            .values(
                study_uid=study_uid,
                sop_uid=sop_uid,
                path=str(path),
                destination=destination,
                status="pending",
                attempts=0,
                next_attempt_at=ts,
                last_error="",
                created_at=ts,
                updated_at=ts,
            )
            .on_conflict_do_nothing(index_elements=["sop_uid", "destination"])
        )
        delivery_id = conn.execute(
            select(deliveries.c.id).where(
                deliveries.c.sop_uid == sop_uid, deliveries.c.destination == destination
            )
        ).scalar_one()
        return int(delivery_id)

    @staticmethod
    def _delivery(row: Any) -> DeliveryRow:
        return DeliveryRow(
            id=int(row.id),
            study_uid=row.study_uid,
            sop_uid=row.sop_uid,
            path=Path(row.path),
            destination=row.destination,
            status=row.status,
            attempts=int(row.attempts),
            next_attempt_at=float(row.next_attempt_at),
            last_error=row.last_error,
        )

    def due_deliveries(self, now: float | None = None, limit: int = 100) -> list[DeliveryRow]:
        """Pending deliveries whose ``next_attempt_at <= now``, oldest first."""
        from sqlalchemy import select

        ts = time.time() if now is None else float(now)
        d = self._tables["deliveries"]
        with self._read() as conn:
            rows = conn.execute(
                select(d)
                .where(d.c.status == "pending", d.c.next_attempt_at <= ts)
                .order_by(d.c.next_attempt_at, d.c.id)
                .limit(int(limit))
            ).all()
        return [self._delivery(r) for r in rows]

    def claim_due_deliveries(
        self, lease_seconds: float, now: float | None = None, limit: int = 100
    ) -> list[DeliveryRow]:
        """Like :meth:`due_deliveries`, but reserve the rows for ``lease_seconds``.

        Their ``next_attempt_at`` moves to ``now + lease_seconds`` in the same transaction, so
        another sender (thread or machine) does not pick them up meanwhile; a sender that dies
        simply lets them become due again.
        """
        from sqlalchemy import select, update

        ts = time.time() if now is None else float(now)
        d = self._tables["deliveries"]
        with self._write() as conn:
            rows = conn.execute(
                select(d)
                .where(d.c.status == "pending", d.c.next_attempt_at <= ts)
                .order_by(d.c.next_attempt_at, d.c.id)
                .limit(int(limit))
                .with_for_update(skip_locked=True)
            ).all()
            if rows:
                conn.execute(
                    update(d)
                    .where(d.c.id.in_([r.id for r in rows]))
                    .values(next_attempt_at=ts + float(lease_seconds), updated_at=ts)
                )
        return [self._delivery(r) for r in rows]

    def mark_delivery_sent(self, delivery_id: int, now: float | None = None) -> None:
        """Mark a delivery ``sent``."""
        from sqlalchemy import update

        ts = time.time() if now is None else float(now)
        d = self._tables["deliveries"]
        with self._write() as conn:
            res = conn.execute(
                update(d)
                .where(d.c.id == int(delivery_id))
                .values(status="sent", sent_at=ts, updated_at=ts, attempts=d.c.attempts + 1)
            )
            if res.rowcount != 1:
                raise WorklistError(f"unknown delivery {delivery_id}")

    def mark_delivery_failed(
        self,
        delivery_id: int,
        error: str,
        retry_in_seconds: float | None = None,
        *,
        permanent: bool = False,
        now: float | None = None,
    ) -> str:
        """Record a failed send.

        Parameters
        ----------
        delivery_id : int
            The delivery.
        error : str
            What went wrong (kept as ``last_error``).
        retry_in_seconds : float, optional
            Delay before the next attempt; default :func:`backoff_seconds` of the attempt count
            with the constructor's base and cap.
        permanent : bool
            Do not retry (e.g. the destination refused the object for good).

        Returns
        -------
        str
            ``pending`` (will be retried) or ``failed``.
        """
        from sqlalchemy import select, update

        ts = time.time() if now is None else float(now)
        d = self._tables["deliveries"]
        with self._write() as conn:
            row = conn.execute(
                select(d.c.attempts, d.c.status).where(d.c.id == int(delivery_id)).with_for_update()
            ).first()
            if row is None:
                raise WorklistError(f"unknown delivery {delivery_id}")
            attempts = int(row.attempts) + 1
            if permanent or attempts >= self.max_delivery_attempts:
                status = "failed"
                next_at = ts
            else:
                status = "pending"
                delay = (
                    backoff_seconds(attempts, self.delivery_backoff_base, self.delivery_backoff_cap)
                    if retry_in_seconds is None
                    else max(0.0, float(retry_in_seconds))
                )
                next_at = ts + delay
            conn.execute(
                update(d)
                .where(d.c.id == int(delivery_id))
                .values(
                    status=status,
                    attempts=attempts,
                    last_error=str(error),
                    next_attempt_at=next_at,
                    updated_at=ts,
                )
            )
        logger.warning(
            "delivery %s attempt %d failed (%s): %s", delivery_id, attempts, status, error
        )
        return status

    # ------------------------------------------------------------------ queries
    def counts_by_status(self) -> dict[str, int]:
        """Number of studies per status (every status present, zeros included)."""
        from sqlalchemy import func, select

        s = self._tables["studies"]
        out = dict.fromkeys(STUDY_STATUSES, 0)
        with self._read() as conn:
            for status, n in conn.execute(select(s.c.status, func.count()).group_by(s.c.status)):
                out[str(status)] = int(n)
        return out

    def delivery_counts_by_status(self) -> dict[str, int]:
        """Number of deliveries per status (every status present, zeros included)."""
        from sqlalchemy import func, select

        d = self._tables["deliveries"]
        out = dict.fromkeys(DELIVERY_STATUSES, 0)
        with self._read() as conn:
            for status, n in conn.execute(select(d.c.status, func.count()).group_by(d.c.status)):
                out[str(status)] = int(n)
        return out

    def _row_dicts(
        self, conn: Connection, rows: Sequence[Any], effective: Mapping[str, float | None]
    ) -> list[dict[str, Any]]:
        from sqlalchemy import func, select

        if not rows:
            return []
        r = self._tables["results"]
        i = self._tables["instances"]
        uids = [row.study_uid for row in rows]
        findings: dict[str, dict[str, dict[str, Any]]] = {uid: {} for uid in uids}
        for fr in conn.execute(
            select(r.c.study_uid, r.c.finding, r.c.probability, r.c.present)
            .where(r.c.study_uid.in_(uids))
            .order_by(r.c.id)
        ):
            findings[fr.study_uid][fr.finding] = {
                "probability": float(fr.probability),
                "present": bool(fr.present),
            }
        counts: dict[str, int] = dict(
            conn.execute(  # type: ignore[arg-type]
                select(i.c.study_uid, func.count())
                .where(i.c.study_uid.in_(uids))
                .group_by(i.c.study_uid)
            ).all()
        )
        return [
            {
                "study_uid": row.study_uid,
                "status": row.status,
                "reason": row.reason,
                "error": row.error,
                "priority_score": row.priority_score,
                "effective_priority": effective.get(row.study_uid),
                "priority_level": row.priority_level,
                "findings": findings[row.study_uid],
                "model_name": row.model_name,
                "model_version": row.model_version,
                "num_instances": int(counts.get(row.study_uid, 0)),
                "received_at": _iso(row.received_at),
                "updated_at": _iso(row.updated_at),
                "accession_hash": row.accession_hash,
            }
            for row in rows
        ]

    def list_worklist(
        self,
        status: str | Sequence[str] | None = None,
        min_priority: float | str | None = None,
        limit: int = 50,
        aging: Any = None,
        now: float | None = None,
    ) -> list[dict[str, Any]]:
        """The worklist, most urgent first.

        Parameters
        ----------
        status : str or sequence of str, optional
            Only these statuses (default: all).
        min_priority : float or str, optional
            A number keeps rows whose effective priority is at least that; a level name
            (``routine``, ``urgent``, ``critical``) keeps rows at or above that level. Either way
            unscored studies are left out.
        limit : int
            At most this many rows (1 or more).
        aging : AgingRule or callable, optional
            ``triage_core.priority.AgingRule`` (applied with
            ``triage_core.priority.effective_priority(score, waited_seconds, rule)``) or a
            function ``(score, waited_seconds) -> float``; ``None`` means no aging.
        now : float, optional
            Current time, for the waited time.

        Returns
        -------
        list of dict
            Rows as described in the module docstring, ordered by effective priority (highest
            first, unscored studies last) then arrival.

        Notes
        -----
        With aging, the order is computed in Python over the (uid, score, arrival) triple of
        every row matching ``status``: correct for any aging rule, O(N) in the matching rows
        (~100 ms for 10^5 rows), then details are fetched for the ``limit`` rows returned.
        Without aging the ordering and limit run in SQL.
        """
        from sqlalchemy import select

        if int(limit) < 1:
            raise WorklistError(f"limit must be >= 1, got {limit!r}")
        statuses: list[str] | None
        if status is None:
            statuses = None
        else:
            statuses = [status] if isinstance(status, str) else list(status)
            bad = [s for s in statuses if s not in STUDY_STATUSES]
            if bad:
                raise WorklistError(f"unknown status {bad[0]!r}; use one of {STUDY_STATUSES}")
        min_score: float | None = None
        min_rank: int | None = None
        if isinstance(min_priority, str):
            if min_priority not in PRIORITY_LEVELS:
                raise WorklistError(
                    f"unknown priority level {min_priority!r}; use one of {PRIORITY_LEVELS}"
                )
            min_rank = PRIORITY_LEVELS.index(min_priority)
        elif min_priority is not None:
            min_score = float(min_priority)
        age_fn = _aging_function(aging)
        ts = time.time() if now is None else float(now)
        s = self._tables["studies"]
        conditions = []
        if statuses is not None:
            conditions.append(s.c.status.in_(statuses))
        if min_score is not None or min_rank is not None:
            conditions.append(s.c.priority_score.is_not(None))
        if min_rank is not None:
            allowed = list(PRIORITY_LEVELS[min_rank:])
            conditions.append(s.c.priority_level.in_(allowed))
        with self._read() as conn:
            if age_fn is None:
                query = select(s).where(*conditions)
                if min_score is not None:
                    query = query.where(s.c.priority_score >= min_score)
                query = query.order_by(
                    s.c.priority_score.desc().nulls_last(), s.c.received_at, s.c.id
                ).limit(int(limit))
                rows = conn.execute(query).all()
                effective = {
                    r.study_uid: (None if r.priority_score is None else float(r.priority_score))
                    for r in rows
                }
                return self._row_dicts(conn, rows, effective)
            candidates = conn.execute(
                select(s.c.study_uid, s.c.priority_score, s.c.received_at, s.c.id).where(
                    *conditions
                )
            ).all()
            scored: list[tuple[float | None, float, int, str]] = []
            for uid, score, received, row_id in candidates:
                eff = (
                    None
                    if score is None
                    else float(age_fn(float(score), max(0.0, ts - float(received))))
                )
                if min_score is not None and (eff is None or eff < min_score):
                    continue
                scored.append((eff, float(received), int(row_id), uid))
            scored.sort(
                key=lambda t: (t[0] is None, -(t[0] if t[0] is not None else 0.0), t[1], t[2])
            )
            top = scored[: int(limit)]
            effective = {uid: eff for eff, _, _, uid in top}
            by_uid = (
                {
                    r.study_uid: r
                    for r in conn.execute(select(s).where(s.c.study_uid.in_(list(effective)))).all()
                }
                if top
                else {}
            )
            rows = [by_uid[uid] for _, _, _, uid in top if uid in by_uid]
            return self._row_dicts(conn, rows, effective)

    def study_detail(
        self, study_uid: str, aging: Any = None, now: float | None = None
    ) -> dict[str, Any] | None:
        """Everything known about one study, or ``None`` if unknown.

        The row of :meth:`list_worklist` plus ``findings`` (with ``threshold`` and
        ``source_uid``), ``images`` (per instance: ``sop_uid``, ``series_uid``,
        ``sop_class_uid``, ``received_at`` and, once processed, ``eligible``, ``reason``,
        ``probabilities``, ``error``), ``deliveries`` (``id``, ``sop_uid``, ``destination``,
        ``status``, ``attempts``, ``next_attempt_at``, ``last_error``, ``sent_at``), ``timings``,
        ``attempts``, ``lease_owner``, ``lease_expires_at``, ``queued_at``, ``completed_at``.
        """
        from sqlalchemy import select

        s = self._tables["studies"]
        r = self._tables["results"]
        i = self._tables["instances"]
        ir = self._tables["image_results"]
        d = self._tables["deliveries"]
        age_fn = _aging_function(aging)
        ts = time.time() if now is None else float(now)
        with self._read() as conn:
            row = conn.execute(select(s).where(s.c.study_uid == study_uid)).first()
            if row is None:
                return None
            eff: float | None = None
            if row.priority_score is not None:
                eff = float(row.priority_score)
                if age_fn is not None:
                    eff = float(age_fn(eff, max(0.0, ts - float(row.received_at))))
            out = self._row_dicts(conn, [row], {study_uid: eff})[0]
            out["findings"] = {
                fr.finding: {
                    "probability": float(fr.probability),
                    "present": bool(fr.present),
                    "threshold": float(fr.threshold),
                    "source_uid": fr.source_uid,
                }
                for fr in conn.execute(select(r).where(r.c.study_uid == study_uid).order_by(r.c.id))
            }
            per_image = {
                x.uid: x for x in conn.execute(select(ir).where(ir.c.study_uid == study_uid))
            }
            images: list[dict[str, Any]] = []
            for inst in conn.execute(
                select(i).where(i.c.study_uid == study_uid).order_by(i.c.received_at, i.c.sop_uid)
            ):
                img: dict[str, Any] = {
                    "sop_uid": inst.sop_uid,
                    "series_uid": inst.series_uid,
                    "sop_class_uid": inst.sop_class_uid,
                    "received_at": _iso(inst.received_at),
                    "eligible": None,
                    "reason": "",
                    "probabilities": {},
                    "error": "",
                }
                res = per_image.pop(inst.sop_uid, None)
                if res is not None:
                    img.update(
                        eligible=bool(res.eligible),
                        reason=res.reason,
                        probabilities=json.loads(res.probabilities),
                        error=res.error,
                    )
                images.append(img)
            for uid, res in per_image.items():  # results keyed by something other than a SOP UID
                images.append(
                    {
                        "sop_uid": uid,
                        "series_uid": "",
                        "sop_class_uid": "",
                        "received_at": None,
                        "eligible": bool(res.eligible),
                        "reason": res.reason,
                        "probabilities": json.loads(res.probabilities),
                        "error": res.error,
                    }
                )
            out["images"] = images
            out["deliveries"] = [
                {
                    "id": int(x.id),
                    "sop_uid": x.sop_uid,
                    "destination": x.destination,
                    "status": x.status,
                    "attempts": int(x.attempts),
                    "next_attempt_at": _iso(x.next_attempt_at),
                    "last_error": x.last_error,
                    "sent_at": _iso(x.sent_at),
                }
                for x in conn.execute(select(d).where(d.c.study_uid == study_uid).order_by(d.c.id))
            ]
        out["timings"] = json.loads(row.timings or "{}")
        out["attempts"] = int(row.attempts)
        out["lease_owner"] = row.lease_owner
        out["lease_expires_at"] = _iso(row.lease_expires_at)
        out["queued_at"] = _iso(row.queued_at)
        out["completed_at"] = _iso(row.completed_at)
        return out

    # ------------------------------------------------------------------ retention
    def purge(self, older_than_seconds: float, now: float | None = None) -> list[Path]:
        """Delete finished studies last updated more than ``older_than_seconds`` ago.

        Only ``done``, ``not_eligible`` and ``failed`` studies without a ``pending`` delivery
        are removed (with their instances, results and deliveries).

        Returns
        -------
        list of Path
            Spooled instance files and output objects the caller should now delete.
        """
        from sqlalchemy import delete, select

        ts = time.time() if now is None else float(now)
        cutoff = ts - float(older_than_seconds)
        s = self._tables["studies"]
        d = self._tables["deliveries"]
        i = self._tables["instances"]
        paths: list[Path] = []
        with self._write() as conn:
            pending = select(d.c.study_uid).where(d.c.status == "pending")
            uids = [
                u
                for (u,) in conn.execute(
                    select(s.c.study_uid).where(
                        s.c.status.in_(_FINISHED_STATUSES),
                        s.c.updated_at < cutoff,
                        s.c.study_uid.not_in(pending),
                    )
                )
            ]
            if not uids:
                return []
            paths.extend(
                Path(p) for (p,) in conn.execute(select(i.c.path).where(i.c.study_uid.in_(uids)))
            )
            paths.extend(
                Path(p) for (p,) in conn.execute(select(d.c.path).where(d.c.study_uid.in_(uids)))
            )
            for name in ("results", "image_results", "deliveries", "instances"):
                table = self._tables[name]
                conn.execute(delete(table).where(table.c.study_uid.in_(uids)))
            conn.execute(delete(s).where(s.c.study_uid.in_(uids)))
        logger.info("purged %d studies (%d files to delete)", len(uids), len(paths))
        return paths
