"""The SQL worklist on a real, throwaway PostgreSQL server (``postgres_database`` fixture)."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from triage_core.errors import WorklistError
from triage_core.spec import Finding, ImageResult, StudyResult
from triage_core.worklist import InstanceRecord, Worklist

pytestmark = pytest.mark.postgres

ROOT = "1.2.826.0.1.3680043.8.498"


def study(n: int) -> str:
    return f"{ROOT}.1.{n}"


def sop(n: int, k: int = 1) -> str:
    return f"{ROOT}.2.{n}.{k}"


def done_result(study_uid: str, score: float) -> StudyResult:
    return StudyResult(
        study_uid=study_uid,
        status="done",
        findings=(Finding("Effusion", score / 100, 0.5, score >= 50, sop(0)),),
        priority_score=score,
        priority_level="urgent" if score >= 50 else "routine",
        images=(ImageResult(sop(0), True, "", {"Effusion": score / 100}),),
        model_name="random-test-model",
        model_version="0",
        timings={"inference": 0.5},
    )


@pytest.fixture()
def pg(postgres_database: str) -> Iterator[Worklist]:
    worklist = Worklist(postgres_database, max_attempts=2, max_delivery_attempts=2)
    worklist.create_all()
    yield worklist
    worklist.dispose()


def test_postgres_lifecycle(pg: Worklist) -> None:
    assert pg.dialect == "postgresql"
    pg.ping()
    assert pg.ingest.record_instance(study(1), sop(1), "/s/1", accession_hash="h1", now=0.0) is True
    assert pg.ingest.record_instance(study(1), sop(1), "/s/1", now=1.0) is False
    assert pg.ingest.record_instances(
        [InstanceRecord(study(2), sop(2), "/s/2"), InstanceRecord(study(1), sop(1), "/s/1")],
        now=2.0,
    ) == [True, False]
    assert pg.queue.queue_stable_studies(5, now=6.0) == [study(1)]
    assert pg.queue.queue_stable_studies(5, now=7.0) == [study(2)]
    claimed = pg.queue.claim_study("w1", 10, now=8.0)
    assert claimed is not None and claimed.study_uid == study(1)
    assert claimed.instances == ((sop(1), Path("/s/1")),)
    # a new instance while processing: the study is processed again afterwards
    pg.ingest.record_instance(study(1), sop(1, 2), "/s/1b", now=9.0)
    assert (
        pg.queue.complete_study(study(1), "w1", done_result(study(1), 80.0), now=10.0)
        == "receiving"
    )
    pg.queue.queue_stable_studies(0, now=11.0)
    again = pg.queue.claim_study("w1", 10, now=12.0)
    assert again is not None and again.study_uid == study(1) and len(again.instances) == 2
    assert pg.queue.complete_study(study(1), "w1", done_result(study(1), 80.0), now=13.0) == "done"
    with pytest.raises(WorklistError, match="no longer holds"):
        pg.queue.complete_study(study(1), "w1", done_result(study(1), 80.0), now=14.0)

    other = pg.queue.claim_study("w2", 10, now=14.0)
    assert other is not None and other.study_uid == study(2)
    assert pg.leases.recover_expired_leases(now=30.0).requeued == (study(2),)
    assert pg.queue.claim_study("w3", 10, now=31.0) is not None
    assert pg.leases.recover_expired_leases(now=50.0).failed == (study(2),)

    rows = pg.queries.list_worklist(now=100.0)
    assert [(r["study_uid"], r["status"]) for r in rows] == [
        (study(1), "done"),
        (study(2), "failed"),
    ]
    assert rows[0]["findings"] == {"Effusion": {"probability": 0.8, "present": True}}
    assert rows[0]["accession_hash"] == "h1"
    aged = pg.queries.list_worklist(aging=lambda score, waited: score + waited, now=100.0)
    assert aged[0]["effective_priority"] == 180.0
    detail = pg.queries.study_detail(study(1))
    assert detail is not None and detail["timings"] == {"inference": 0.5}
    images = {img["sop_uid"]: img for img in detail["images"]}
    assert images[sop(0)]["probabilities"] == {"Effusion": 0.8}
    assert images[sop(1, 2)]["eligible"] is None
    counts = pg.queries.counts_by_status()
    assert counts["done"] == 1 and counts["failed"] == 1 and counts["queued"] == 0

    d = pg.deliveries.add(study(1), f"{ROOT}.9.1", "/o/1", "PACS@127.0.0.1:104", now=20.0)
    assert pg.deliveries.add(study(1), f"{ROOT}.9.1", "/o/1", "PACS@127.0.0.1:104") == d
    assert [x.id for x in pg.deliveries.claim_due(30, now=21.0)] == [d]
    assert pg.deliveries.due(now=22.0) == []
    assert pg.deliveries.mark_failed(d, "refused", now=60.0) == "pending"
    assert pg.deliveries.mark_failed(d, "refused", now=200.0) == "failed"
    assert pg.queries.delivery_counts_by_status()["failed"] == 1
    purged = pg.retention.purge(10, now=1000.0)
    assert sorted(purged) == sorted([Path("/s/1"), Path("/s/1b"), Path("/o/1"), Path("/s/2")])
    assert pg.queries.counts_by_status() == dict.fromkeys(counts, 0)


def _claim_until_empty(url: str, name: str, start: float, out: multiprocessing.Queue) -> None:
    """Child process: its own engine, claims and completes until the queue is empty."""
    worklist = Worklist(url)
    claimed_uids: list[str] = []
    try:
        while time.time() < start:
            time.sleep(0.005)
        while (claimed := worklist.queue.claim_study(name, 60)) is not None:
            claimed_uids.append(claimed.study_uid)
            worklist.queue.complete_study(
                claimed.study_uid, name, done_result(claimed.study_uid, 10.0)
            )
        out.put((name, claimed_uids, ""))
    except WorklistError as exc:
        out.put((name, claimed_uids, str(exc)))
    finally:
        worklist.dispose()


def test_postgres_concurrent_claims_from_processes(pg: Worklist, postgres_database: str) -> None:
    pg.ingest.record_instances(
        [InstanceRecord(study(n), sop(n), f"/s/{n}") for n in range(20)], now=time.time() - 60
    )
    assert len(pg.queue.queue_stable_studies(10)) == 20
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    start = time.time() + 1.0
    procs = [
        ctx.Process(target=_claim_until_empty, args=(postgres_database, f"p{i}", start, out))
        for i in range(3)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert [err for _, _, err in results] == ["", "", ""]
    claims = Counter(uid for _, uids, _ in results for uid in uids)
    assert claims == Counter(study(n) for n in range(20))  # every study exactly once
    assert pg.queries.counts_by_status()["done"] == 20


def test_postgres_skip_locked_lets_a_second_claimer_pass(pg: Worklist) -> None:
    """While one transaction holds the oldest queued row, another claim takes the next one."""
    from sqlalchemy import text

    pg.ingest.record_instances(
        [InstanceRecord(study(n), sop(n), f"/s/{n}") for n in (1, 2)], now=0.0
    )
    pg.queue.queue_stable_studies(0, now=1.0)
    with pg.engine.connect() as conn:
        with conn.begin():
            locked = conn.execute(
                text(
                    "SELECT study_uid FROM studies WHERE status = 'queued' "
                    "ORDER BY received_at, id LIMIT 1 FOR UPDATE"
                )
            ).scalar_one()
            assert locked == study(1)
            started = time.monotonic()
            claimed = pg.queue.claim_study("other", 10, now=2.0)
            assert time.monotonic() - started < 5.0  # did not wait for the lock
            assert claimed is not None and claimed.study_uid == study(2)


def _create_schema(url: str, out: multiprocessing.Queue) -> None:
    worklist = Worklist(url)
    try:
        worklist.create_all()
        out.put("")
    except WorklistError as exc:
        out.put(str(exc))
    finally:
        worklist.dispose()


def test_postgres_concurrent_create_all(postgres_database: str) -> None:
    """Several processes starting at once against one new database all succeed."""
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_create_schema, args=(postgres_database, out)) for _ in range(4)]
    for proc in procs:
        proc.start()
    errors = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert errors == ["", "", "", ""]
    worklist = Worklist(postgres_database)
    assert worklist.queries.counts_by_status()["queued"] == 0
    worklist.dispose()
