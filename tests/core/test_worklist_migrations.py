"""Worklist schema migrations (Alembic): new databases, and databases made before Alembic.

The "before" databases are real: ``tests/core/data/worklist_v1*.sql`` were dumped from databases
that the pre-Alembic worklist code made (SQLite and PostgreSQL), with studies in every status.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from triage_core.errors import WorklistError
from triage_core.spec import Finding, ImageResult, StudyResult
from triage_core.uids import hash_identifier
from triage_core.worklist import HEAD_REVISION, SCHEMA_VERSION, Worklist
from triage_core.worklist.schema import (
    LEGACY_REVISION,
    alembic_config,
    build_tables,
    current_revision,
)

DATA = Path(__file__).parent / "data"
ROOT = "1.2.826.0.1.3680043.8.498"
T0 = 1_700_000_000.0  # the fixtures' clock


def study(n: int) -> str:
    return f"{ROOT}.1.{n}"


def sop(n: int, k: int = 1) -> str:
    return f"{ROOT}.2.{n}.{k}"


def restore_sqlite(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(directory / "worklist.sqlite3")
    try:
        raw.executescript((DATA / "worklist_v1.sql").read_text())
    finally:
        raw.close()
    return Worklist.sqlite_url(directory)


def restore_postgres(url: str) -> str:
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute((DATA / "worklist_v1_postgres.sql").read_text().encode())
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def legacy_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return restore_sqlite(tmp_path / "storage")
    url: str = request.getfixturevalue("postgres_database")
    return restore_postgres(url)


@pytest.fixture()
def opened(legacy_url: str) -> Iterator[Worklist]:
    worklist = Worklist(legacy_url, max_attempts=2)
    worklist.create_all()
    yield worklist
    worklist.dispose()


def schema_diff(worklist: Worklist) -> list[object]:
    with worklist.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), build_tables().metadata))


def revision_and_meta(worklist: Worklist) -> tuple[str | None, str]:
    with worklist.engine.connect() as conn:
        meta = conn.execute(
            text("SELECT value FROM worklist_meta WHERE key = 'schema_version'")
        ).scalar_one()
        return current_revision(conn), str(meta)


def test_legacy_fixture_is_what_it_claims(legacy_url: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(legacy_url)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            assert "alembic_version" not in names
            assert {"studies", "instances", "results", "deliveries", "worklist_meta"} <= names
            version = conn.execute(text("SELECT value FROM worklist_meta")).scalar_one()
            assert version == "1"
    finally:
        engine.dispose()


def test_legacy_database_upgrades_to_head(opened: Worklist) -> None:
    assert revision_and_meta(opened) == (HEAD_REVISION, str(SCHEMA_VERSION))
    assert schema_diff(opened) == []  # the migrated layout is exactly the tables of schema.py
    with opened.engine.connect() as conn:
        indexes = {ix["name"] for ix in inspect(conn).get_indexes("studies")}
    assert "ix_studies_lease_owner" in indexes
    opened.create_all()  # idempotent on an upgraded database
    assert revision_and_meta(opened) == (HEAD_REVISION, str(SCHEMA_VERSION))


def test_legacy_rows_survive_the_upgrade(opened: Worklist) -> None:
    assert opened.queries.counts_by_status() == {
        "receiving": 1,
        "queued": 1,
        "processing": 1,
        "done": 1,
        "not_eligible": 1,
        "failed": 1,
    }
    assert opened.queries.delivery_counts_by_status() == {"pending": 1, "sent": 1, "failed": 0}
    detail = opened.queries.study_detail(study(1))
    assert detail is not None
    assert detail["findings"]["Effusion"] == {
        "probability": 0.8,
        "present": True,
        "threshold": 0.5,
        "source_uid": sop(1),
    }
    assert detail["priority_level"] == "urgent" and detail["timings"] == {"inference": 0.02}
    assert [img["eligible"] for img in detail["images"]] == [True, False]
    assert [d["status"] for d in detail["deliveries"]] == ["sent", "pending"]
    # the identifier hash of triage_core.uids matches what the old code stored
    assert detail["accession_hash"] == hash_identifier("ACC1", "salt")
    failed = opened.queries.study_detail(study(4))
    assert failed is not None and failed["error"] == "transient" and failed["attempts"] == 2


def test_legacy_database_keeps_working_after_the_upgrade(opened: Worklist) -> None:
    t = T0 + 50
    # the lease held before the upgrade is renewed by its owner, in one statement
    assert opened.leases.renew_leases("host:2:w1", 60, now=t) == [study(3)]
    claimed = opened.queue.claim_study("new-worker", 60, now=t)
    assert claimed is not None and claimed.study_uid == study(5)
    result = StudyResult(
        study_uid=study(5),
        status="done",
        findings=(Finding("Effusion", 0.2, 0.5, False, sop(5)),),
        priority_score=20.0,
        priority_level="routine",
        images=(ImageResult(sop(5), True, "", {"Effusion": 0.2}),),
        model_name="m",
        model_version="1",
    )
    deliveries = [(f"{ROOT}.9.5", "/outbox/sr5.dcm", "PACS@127.0.0.1:11112")]
    assert (
        opened.queue.complete_study(study(5), "new-worker", result, t, deliveries=deliveries)
        == "done"
    )
    # sequences continue after the old rows (no primary-key clash on PostgreSQL either)
    assert [d.id for d in opened.deliveries.claim_due(30, now=t + 1)] == [2, 3]
    assert opened.ingest.record_instance(study(1), sop(1, 3), "/spool/x.dcm", now=t + 2) is True
    assert opened.queries.study_detail(study(1))["status"] == "receiving"  # type: ignore[index]
    assert opened.ingest.record_instance(study(8), sop(8), "/spool/y.dcm", now=t + 2) is True
    assert opened.retention.purge(1, now=t + 1000) != []


def test_fresh_database_matches_the_tables(tmp_path: Path) -> None:
    worklist = Worklist(Worklist.sqlite_url(tmp_path))
    worklist.create_all()
    try:
        assert revision_and_meta(worklist) == (HEAD_REVISION, str(SCHEMA_VERSION))
        assert schema_diff(worklist) == []
    finally:
        worklist.dispose()


@pytest.mark.postgres
def test_fresh_postgres_database_matches_the_tables(postgres_database: str) -> None:
    worklist = Worklist(postgres_database)
    worklist.create_all()
    try:
        assert revision_and_meta(worklist) == (HEAD_REVISION, str(SCHEMA_VERSION))
        assert schema_diff(worklist) == []
    finally:
        worklist.dispose()


def test_downgrade_to_the_legacy_layout_and_back(tmp_path: Path) -> None:
    worklist = Worklist(Worklist.sqlite_url(tmp_path))
    worklist.create_all()
    try:
        with worklist.engine.begin() as conn:
            command.downgrade(alembic_config(conn), LEGACY_REVISION)
        assert revision_and_meta(worklist) == (LEGACY_REVISION, "1")
        with worklist.engine.connect() as conn:
            assert "ix_studies_lease_owner" not in {
                ix["name"] for ix in inspect(conn).get_indexes("studies")
            }
        worklist.create_all()
        assert revision_and_meta(worklist) == (HEAD_REVISION, str(SCHEMA_VERSION))
        assert schema_diff(worklist) == []
    finally:
        worklist.dispose()


def test_database_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    worklist = Worklist(Worklist.sqlite_url(tmp_path))
    worklist.create_all()
    try:
        with worklist.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
        with pytest.raises(WorklistError, match="newer cxr-triage"):
            worklist.create_all()
    finally:
        worklist.dispose()


def test_unknown_pre_alembic_layout_is_refused(tmp_path: Path) -> None:
    url = restore_sqlite(tmp_path / "storage")
    raw = sqlite3.connect(tmp_path / "storage" / "worklist.sqlite3")
    try:
        raw.execute("UPDATE worklist_meta SET value = '7'")
        raw.commit()
    finally:
        raw.close()
    worklist = Worklist(url)
    try:
        with pytest.raises(WorklistError, match="schema version 7"):
            worklist.create_all()
        with worklist.engine.connect() as conn:  # nothing was stamped or changed
            assert "alembic_version" not in inspect(conn).get_table_names()
    finally:
        worklist.dispose()


def _open(url: str, out: multiprocessing.Queue) -> None:
    worklist = Worklist(url)
    try:
        worklist.create_all()
        out.put("")
    except WorklistError as exc:
        out.put(str(exc))
    finally:
        worklist.dispose()


@pytest.mark.postgres
def test_processes_upgrading_one_legacy_database_at_once(postgres_database: str) -> None:
    url = restore_postgres(postgres_database)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_open, args=(url, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    errors = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert errors == ["", "", "", ""]
    worklist = Worklist(url)
    try:
        assert revision_and_meta(worklist) == (HEAD_REVISION, str(SCHEMA_VERSION))
        assert worklist.queries.counts_by_status()["processing"] == 1
    finally:
        worklist.dispose()


def test_reopening_at_head_runs_no_migration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Worklist(Worklist.sqlite_url(tmp_path)).create_all()
    worklist = Worklist(Worklist.sqlite_url(tmp_path))
    try:
        with caplog.at_level("DEBUG"):
            worklist.create_all()
        assert not [r for r in caplog.records if r.name.startswith("alembic")]
        assert revision_and_meta(worklist) == (HEAD_REVISION, str(SCHEMA_VERSION))
    finally:
        worklist.dispose()
