"""One engine per process, short transactions, and the schema upgrade at open.

SQLite notes: WAL journal, ``synchronous=FULL`` by default (the C-STORE handler answers success
only after the instance row is committed, so a committed row must survive a power cut),
``busy_timeout``, ``foreign_keys=ON``. Every writing transaction starts with ``BEGIN IMMEDIATE``
(serialised writers, no lock-upgrade deadlocks); reads use a plain deferred ``BEGIN`` and never
block writers in WAL mode.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import URL, Connection, Engine, Table, create_engine, event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from triage_core.errors import WorklistError
from triage_core.worklist.schema import HEAD_REVISION, Tables, build_tables, upgrade

logger = logging.getLogger(__name__)

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_PG_SCHEMA_LOCK = 0x43585254  # advisory lock key serialising schema upgrades across processes


def sqlite_url(storage_dir: str | Path) -> str:
    """The URL of the embedded SQLite worklist under ``storage_dir``."""
    path = Path(storage_dir).expanduser().resolve() / "worklist.sqlite3"
    return f"sqlite+pysqlite:///{path}"


def _parse(url: str) -> URL:
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
    return parsed


class Database:
    """The engine, its transactions and the tables (shared by the worklist's parts).

    Parameters
    ----------
    url : str
        ``sqlite+pysqlite:///PATH`` or ``postgresql+psycopg://user@host:port/db``.
    sqlite_synchronous : str
        ``PRAGMA synchronous`` for SQLite.
    busy_timeout_ms : int
        How long a SQLite writer waits for the write lock before failing.
    echo : bool
        Log SQL statements (debugging).

    Raises
    ------
    WorklistError
        For an unsupported or invalid URL or setting.
    """

    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: str = "FULL",
        busy_timeout_ms: int = 30000,
        echo: bool = False,
    ) -> None:
        sync = sqlite_synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise WorklistError(f"sqlite_synchronous must be one of {_SYNCHRONOUS}, got {sync!r}")
        self.url = _parse(url)
        self.dialect = self.url.get_backend_name()
        connect_args: dict[str, Any] = {}
        if self.dialect == "sqlite":
            connect_args = {"timeout": busy_timeout_ms / 1000.0, "check_same_thread": False}
        self.engine: Engine = create_engine(
            self.url,
            echo=echo,
            pool_pre_ping=self.dialect != "sqlite",
            connect_args=connect_args,
        )
        if self.dialect == "sqlite":
            _install_sqlite_events(self.engine, sync, int(busy_timeout_ms))
        self.tables: Tables = build_tables()
        logger.info("worklist database: %s", self.url.render_as_string(hide_password=True))

    def create_all(self) -> str:
        """Create or upgrade the schema (idempotent; creates the SQLite parent folder).

        Returns
        -------
        str
            The revision found before (see :func:`~triage_core.worklist.schema.upgrade`).
        """
        if self.dialect == "sqlite" and self.url.database:
            Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
                with conn.begin():
                    if self.dialect == "postgresql":
                        # several serve/worker processes may start at once
                        conn.execute(text(f"SELECT pg_advisory_xact_lock({_PG_SCHEMA_LOCK})"))
                    before = upgrade(conn, self.tables)
        except SQLAlchemyError as exc:
            raise WorklistError(f"cannot create the worklist tables: {exc}") from exc
        if before != HEAD_REVISION:
            logger.info("worklist schema: revision %s -> %s", before, HEAD_REVISION)
        return before

    def ping(self) -> None:
        """Run ``SELECT 1``; raise :class:`WorklistError` when the database is unreachable."""
        with self.read() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        """Close pooled connections (call once at shutdown)."""
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A writing transaction (``BEGIN IMMEDIATE`` on SQLite), committed on exit."""
        try:
            with self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise WorklistError(f"worklist write failed: {exc}") from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A reading transaction."""
        try:
            with self.engine.connect() as conn:
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise WorklistError(f"worklist query failed: {exc}") from exc

    def insert(self, table: Table) -> Any:
        """The dialect's ``INSERT`` (it has ``on_conflict_do_nothing``)."""
        if self.dialect == "postgresql":
            return pg_insert(table)
        return sqlite_insert(table)

    def notify(self, conn: Connection, channel: str) -> None:
        """``NOTIFY channel`` in ``conn``'s transaction (delivered at commit; PostgreSQL only)."""
        if self.dialect == "postgresql":
            conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": channel})


def _install_sqlite_events(engine: Engine, synchronous: str, busy_timeout_ms: int) -> None:
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
