"""The worklist tables and their migrations (Alembic, run programmatically when a database opens).

The tables below describe the newest layout; the migrations in ``migrations/versions/`` build it
step by step and are what actually creates and changes a database. A test compares the two
(``alembic.autogenerate.compare_metadata``) so they cannot drift apart.

Databases made before the worklist used Alembic (schema version 1, kept in ``worklist_meta``) have
exactly the layout of revision ``0001``: :func:`upgrade` stamps them with it, then upgrades them
like any other database. The ``worklist_meta.schema_version`` row is kept up to date by the
migrations, so that a cxr-triage from before Alembic refuses a newer database instead of using it.

Adding a change: write ``migrations/versions/NNNN_what.py`` (``revision = "NNNN"``,
``down_revision`` the previous one; ``op.*`` calls only, never the tables of this module, which
move on), update the tables here and bump :data:`SCHEMA_VERSION` in the same revision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    inspect,
    select,
    text,
)

from triage_core.errors import WorklistError

if TYPE_CHECKING:
    from alembic.config import Config

#: Value of ``worklist_meta.schema_version`` at the newest revision (``1`` before Alembic).
SCHEMA_VERSION = 4
#: The newest Alembic revision.
HEAD_REVISION = "0004"
#: The revision whose layout equals that of a schema-version-1 database made before Alembic.
LEGACY_REVISION = "0001"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


@dataclass(frozen=True)
class Tables:
    """The worklist's tables, bound to one ``MetaData``."""

    metadata: MetaData
    studies: Table
    instances: Table
    results: Table
    image_results: Table
    deliveries: Table
    meta: Table
    verdicts: Table
    tokens: Table


def _study_fk() -> Column[str]:
    return Column(
        "study_uid",
        String(64),
        ForeignKey("studies.study_uid", ondelete="CASCADE"),
        nullable=False,
    )


def build_tables() -> Tables:
    """The newest table layout (a fresh ``MetaData`` per call)."""
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
        # revision 0003: out-of-distribution outcome (triage_core.ood); false/null before
        Column("low_confidence", Boolean, nullable=False, default=False, server_default=false()),
        Column("ood_score", Double, nullable=True),
        Column("model_name", String(128), nullable=False, default=""),
        Column("model_version", String(64), nullable=False, default=""),
        Column("timings", Text, nullable=False, default="{}"),
        Index("ix_studies_status_received", "status", "received_at"),
        Index("ix_studies_status_lease", "status", "lease_expires_at"),
        Index("ix_studies_lease_owner", "lease_owner"),  # revision 0002
    )
    instances = Table(
        "instances",
        md,
        Column("sop_uid", String(64), primary_key=True),
        _study_fk(),
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
        _study_fk(),
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
        _study_fk(),
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
        _study_fk(),
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
    # revision 0004: readers' verdicts, append-only (a change is a new row; the latest counts)
    verdicts = Table(
        "verdicts",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        _study_fk(),
        Column("finding", String(64), nullable=False),
        Column("verdict", String(16), nullable=False),
        Column("note", Text, nullable=False),
        Column("user_name", String(64), nullable=False),
        Column("at", Double, nullable=False),
        Column("model_name", String(128), nullable=False),
        Column("model_version", String(64), nullable=False),
        Column("probability", Double, nullable=True),
        Index("ix_verdicts_study_finding", "study_uid", "finding"),
    )
    # revision 0004: named HTTP access tokens (only a SHA-256 of the token is stored)
    tokens = Table(
        "api_tokens",
        md,
        Column("name", String(64), primary_key=True),
        Column("role", String(16), nullable=False),
        Column("token_hash", String(64), nullable=False, unique=True),
        Column("created_at", Double, nullable=False),
        Column("revoked_at", Double, nullable=True),
    )
    return Tables(
        md, studies, instances, results, image_results, deliveries, meta, verdicts, tokens
    )


def alembic_config(connection: Connection) -> Config:
    """An Alembic configuration that runs the shipped migrations on ``connection``.

    Alembic is imported here, not at module level: the usual open (already at the newest
    revision) never loads it (0.9 s of a node's start)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def current_revision(connection: Connection) -> str | None:
    """The database's Alembic revision (``None``: not under Alembic yet, or empty).

    Read from Alembic's ``alembic_version`` table directly: the usual open (already at the
    newest revision) then needs no migration context.
    """
    if "alembic_version" not in inspect(connection).get_table_names():
        return None
    found = list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
    if len(found) > 1:
        raise WorklistError(f"the worklist database has several Alembic revisions: {found}")
    return str(found[0]) if found else None


def _meta_version(connection: Connection, tables: Tables) -> str | None:
    if "worklist_meta" not in inspect(connection).get_table_names():
        return None
    meta = tables.meta
    found = connection.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    return None if found is None else str(found)


def upgrade(connection: Connection, tables: Tables) -> str:
    """Create or upgrade the schema to :data:`HEAD_REVISION` in the caller's transaction.

    The caller holds the database's write lock (``BEGIN IMMEDIATE`` on SQLite, an advisory lock
    on PostgreSQL) so that processes starting together migrate one after the other.

    Returns
    -------
    str
        The revision the database had before (``"none"`` for a new database, ``"legacy"`` for a
        schema-version-1 database from before Alembic).

    Raises
    ------
    WorklistError
        For a database of an unknown layout or made by a newer cxr-triage.
    """
    before = current_revision(connection)
    if before == HEAD_REVISION:  # the usual open: no migration scripts to load
        _check_meta(connection, tables)
        return before
    from alembic import command
    from alembic.util.exc import CommandError

    config = alembic_config(connection)
    if before is None:
        has_tables = "studies" in inspect(connection).get_table_names()
        legacy = _meta_version(connection, tables)
        if has_tables and legacy != "1":
            raise WorklistError(
                f"the worklist database has schema version {legacy}, this code uses "
                f"{SCHEMA_VERSION}: use a new database (or --db) or the matching cxr-triage"
            )
        if has_tables:
            command.stamp(config, LEGACY_REVISION)
            before = "legacy"
    try:
        command.upgrade(config, "head")
    except CommandError as exc:
        raise WorklistError(
            f"cannot upgrade the worklist database from revision {before}: {exc} "
            "(a database made by a newer cxr-triage?)"
        ) from exc
    _check_meta(connection, tables)
    return before or "none"


def _check_meta(connection: Connection, tables: Tables) -> None:
    found = _meta_version(connection, tables)
    if found != str(SCHEMA_VERSION):
        raise WorklistError(
            f"the worklist database has schema version {found}, this code uses "
            f"{SCHEMA_VERSION}: use a new database (or --db) or the matching cxr-triage"
        )
