"""The SQL worklist on the embedded SQLite backend: lifecycle, leases, deliveries, queries."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_worklist_support import ROOT, result_for, sop, study

from triage_core.errors import InvalidUIDError, WorklistError
from triage_core.spec import Finding, ImageResult, StudyResult
from triage_core.worklist import (
    DELIVERY_STATUSES,
    SCHEMA_VERSION,
    STUDY_STATUSES,
    InstanceRecord,
    Worklist,
    backoff_seconds,
    hash_identifier,
    is_valid_uid,
)


@pytest.fixture()
def wl(tmp_path: Path) -> Iterator[Worklist]:
    worklist = Worklist(Worklist.sqlite_url(tmp_path / "storage"), max_attempts=2)
    worklist.create_all()
    yield worklist
    worklist.dispose()


def test_sqlite_url_and_pragmas(tmp_path: Path, wl: Worklist) -> None:
    url = Worklist.sqlite_url(tmp_path / "storage")
    assert url.endswith("/storage/worklist.sqlite3") and url.startswith("sqlite+pysqlite:///")
    db_file = tmp_path / "storage" / "worklist.sqlite3"
    assert db_file.is_file()
    with wl.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    wl.create_all()  # idempotent
    raw = sqlite3.connect(db_file)
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    raw.close()
    assert {"studies", "instances", "results", "image_results", "deliveries"} <= tables
    wl.ping()


def test_constructor_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(WorklistError, match="unsupported database"):
        Worklist("mysql://localhost/x")
    with pytest.raises(WorklistError, match="in-memory"):
        Worklist("sqlite://")
    with pytest.raises(WorklistError, match="sqlite_synchronous"):
        Worklist(Worklist.sqlite_url(tmp_path), sqlite_synchronous="SOMETIMES")
    with pytest.raises(WorklistError, match="max_attempts"):
        Worklist(Worklist.sqlite_url(tmp_path), max_attempts=0)


def test_unreachable_database_is_a_worklist_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    worklist = Worklist(f"sqlite+pysqlite:///{blocker}/sub/worklist.sqlite3")
    with pytest.raises(WorklistError):
        worklist.ping()


def test_uid_grammar_helpers() -> None:
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.1")
    assert is_valid_uid("0.0")
    for bad in ("", "1..2", "1.02", "../etc", "1.2.a", "1." + "1" * 70, None, "1.2.", ".1"):
        assert not is_valid_uid(bad), bad
    assert hash_identifier("") == ""
    assert hash_identifier("ACC1", "s") != hash_identifier("ACC1", "t")
    assert len(hash_identifier("ACC1")) == 16 and "ACC1" not in hash_identifier("ACC1")


def test_record_instance_is_idempotent(wl: Worklist) -> None:
    assert wl.ingest.record_instance(study(1), sop(1), "/spool/a.dcm", now=10.0) is True
    assert wl.ingest.record_instance(study(1), sop(1), "/spool/a.dcm", now=11.0) is False
    assert wl.ingest.record_instance(study(1), sop(1, 2), "/spool/b.dcm", now=12.0) is True
    detail = wl.queries.study_detail(study(1))
    assert detail is not None
    assert [img["sop_uid"] for img in detail["images"]] == [sop(1), sop(1, 2)]
    assert detail["num_instances"] == 2
    assert wl.queries.counts_by_status()["receiving"] == 1
    with pytest.raises(InvalidUIDError):
        wl.ingest.record_instance("../../etc", sop(1, 3), "/spool/c.dcm")
    with pytest.raises(InvalidUIDError):
        wl.ingest.record_instance(study(1), "1.2.03", "/spool/c.dcm")
    with pytest.raises(InvalidUIDError):  # the old worklist check let a final newline through
        wl.ingest.record_instance(study(1) + "\n", sop(1, 4), "/spool/d.dcm")
    assert (
        wl.queries.counts_by_status()["receiving"] == 1
    )  # nothing of the refused calls was stored


def test_record_instances_batch(wl: Worklist) -> None:
    batch = [
        InstanceRecord(study(1), sop(1, 1), "/s/1", accession_hash="abc"),
        InstanceRecord(study(1), sop(1, 2), "/s/2"),
        InstanceRecord(study(2), sop(2, 1), "/s/3", series_uid=f"{ROOT}.3.2"),
        InstanceRecord(study(1), sop(1, 1), "/s/1"),
    ]
    assert wl.ingest.record_instances(batch, now=5.0) == [True, True, True, False]
    assert wl.ingest.record_instances([InstanceRecord(study(1), sop(1, 2), "/s/2")]) == [False]
    assert wl.queries.counts_by_status()["receiving"] == 2
    detail = wl.queries.study_detail(study(1))
    assert detail is not None and detail["accession_hash"] == "abc"
    assert detail["num_instances"] == 2
    assert wl.ingest.record_instances([]) == []


def test_lifecycle_fifo_and_results(wl: Worklist) -> None:
    wl.ingest.record_instance(study(2), sop(2), "/spool/2.dcm", now=100.0)
    wl.ingest.record_instance(study(1), sop(1), "/spool/1.dcm", now=101.0)
    wl.ingest.record_instance(study(1), sop(1, 2), "/spool/1b.dcm", now=104.0)
    # study 1 got its last instance at 104: not stable for 10 s at 110
    assert wl.queue.queue_stable_studies(10, now=110.0) == [study(2)]
    assert wl.queue.queue_stable_studies(10, now=114.0) == [study(1)]
    assert wl.queue.queue_stable_studies(10, now=200.0) == []
    counts = wl.queries.counts_by_status()
    assert counts["queued"] == 2 and set(counts) == set(STUDY_STATUSES)
    first = wl.queue.claim_study("worker-a", 30, now=120.0)
    second = wl.queue.claim_study("worker-b", 30, now=120.0)
    assert first is not None and second is not None
    assert (first.study_uid, second.study_uid) == (study(2), study(1))  # FIFO by first arrival
    assert second.instances == ((sop(1), Path("/spool/1.dcm")), (sop(1, 2), Path("/spool/1b.dcm")))
    assert first.attempts == 1 and first.lease_expires_at == 150.0
    assert wl.queue.claim_study("worker-c", 30, now=121.0) is None
    assert wl.queries.counts_by_status()["processing"] == 2

    status = wl.queue.complete_study(
        study(1), "worker-b", result_for(study(1), 72.5, "urgent", source=sop(1)), now=130.0
    )
    assert status == "done"
    not_eligible = result_for(study(2), 0.0, status="not_eligible", reason="lateral view")
    assert wl.queue.complete_study(study(2), "worker-a", not_eligible, now=131.0) == "not_eligible"

    detail = wl.queries.study_detail(study(1))
    assert detail is not None
    assert detail["status"] == "done" and detail["priority_score"] == 72.5
    assert detail["priority_level"] == "urgent" and detail["model_name"] == "random-test-model"
    assert detail["findings"]["Effusion"] == {
        "probability": 0.725,
        "present": True,
        "threshold": 0.5,
        "source_uid": sop(1),
    }
    assert detail["findings"]["Atelectasis"]["present"] is False
    assert detail["timings"] == {"preprocess": 0.01, "inference": 0.02}
    assert detail["lease_owner"] is None and detail["attempts"] == 1
    images = {img["sop_uid"]: img for img in detail["images"]}
    assert images[sop(1)]["eligible"] is True
    assert images[sop(1)]["probabilities"]["Effusion"] == pytest.approx(0.725)
    assert images[sop(1, 2)]["eligible"] is None  # no per-image result stored for it
    other = wl.queries.study_detail(study(2))
    assert other is not None and other["status"] == "not_eligible"
    assert other["reason"] == "lateral view" and other["findings"] == {}
    assert wl.queries.study_detail(study(99)) is None


def test_complete_refuses_inconsistent_results(wl: Worklist) -> None:
    wl.ingest.record_instance(study(1), sop(1), "/s", now=0.0)
    wl.queue.queue_stable_studies(0, now=1.0)
    assert wl.queue.claim_study("w", 10, now=1.0) is not None
    with pytest.raises(WorklistError, match="not"):
        wl.queue.complete_study(study(1), "w", result_for(study(2), 10.0), now=2.0)
    bad_status = StudyResult(study_uid=study(1), status="processing")
    with pytest.raises(WorklistError, match="status"):
        wl.queue.complete_study(study(1), "w", bad_status, now=2.0)
    with pytest.raises(WorklistError, match="no longer holds"):
        wl.queue.complete_study(study(1), "intruder", result_for(study(1), 10.0), now=2.0)
    assert wl.queue.complete_study(study(1), "w", result_for(study(1), 10.0), now=2.0) == "done"
    with pytest.raises(WorklistError, match="no longer holds"):
        wl.queue.complete_study(study(1), "w", result_for(study(1), 10.0), now=3.0)


@pytest.mark.parametrize("final", ["done", "not_eligible"])
def test_new_instance_requeues_finished_study(wl: Worklist, final: str) -> None:
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    wl.queue.queue_stable_studies(1, now=2.0)
    assert wl.queue.claim_study("w", 10, now=3.0) is not None
    wl.queue.complete_study(
        study(1), "w", result_for(study(1), 30.0, status=final, reason="x"), now=4.0
    )
    assert (
        wl.ingest.record_instance(study(1), sop(1), "/s/1", now=5.0) is False
    )  # repeat: no change
    assert wl.queries.counts_by_status()[final] == 1
    assert wl.ingest.record_instance(study(1), sop(1, 2), "/s/2", now=6.0) is True
    detail = wl.queries.study_detail(study(1))
    assert detail is not None and detail["status"] == "receiving" and detail["attempts"] == 0
    assert wl.queue.queue_stable_studies(1, now=6.5) == []
    assert wl.queue.queue_stable_studies(1, now=7.0) == [study(1)]
    claimed = wl.queue.claim_study("w2", 10, now=8.0)
    assert claimed is not None and len(claimed.instances) == 2


def test_instance_during_processing_reruns_study(wl: Worklist) -> None:
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    wl.queue.queue_stable_studies(1, now=2.0)
    claimed = wl.queue.claim_study("w", 10, now=3.0)
    assert claimed is not None and len(claimed.instances) == 1
    wl.ingest.record_instance(study(1), sop(1, 2), "/s/2", now=4.0)
    assert wl.queries.counts_by_status()["processing"] == 1  # the worker keeps its lease
    assert (
        wl.queue.complete_study(study(1), "w", result_for(study(1), 40.0), now=5.0) == "receiving"
    )
    detail = wl.queries.study_detail(study(1))
    assert detail is not None and detail["priority_score"] == 40.0  # earlier result kept
    assert wl.queue.queue_stable_studies(1, now=5.5) == [study(1)]
    again = wl.queue.claim_study("w", 10, now=6.0)
    assert again is not None and len(again.instances) == 2
    assert wl.queue.complete_study(study(1), "w", result_for(study(1), 50.0), now=7.0) == "done"


def test_lease_expiry_requeues_then_fails(wl: Worklist) -> None:
    # max_attempts=2 (fixture)
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    wl.queue.queue_stable_studies(0, now=0.0)
    first = wl.queue.claim_study("w1", 10, now=1.0)
    assert first is not None and first.attempts == 1
    assert wl.leases.recover_expired_leases(now=10.0).requeued == ()  # expires at 11
    assert wl.leases.renew_lease(study(1), "w1", 10, now=10.0) == 20.0
    recovered = wl.leases.recover_expired_leases(now=20.5)
    assert recovered.requeued == (study(1),) and recovered.failed == ()
    assert wl.queries.counts_by_status()["queued"] == 1
    with pytest.raises(WorklistError, match="no longer holds"):
        wl.leases.renew_lease(study(1), "w1", 10, now=21.0)
    with pytest.raises(WorklistError, match="no longer holds"):
        wl.queue.complete_study(study(1), "w1", result_for(study(1), 10.0), now=21.0)
    second = wl.queue.claim_study("w2", 10, now=22.0)
    assert second is not None and second.attempts == 2
    recovered = wl.leases.recover_expired_leases(now=40.0)
    assert recovered.failed == (study(1),) and recovered.requeued == ()
    detail = wl.queries.study_detail(study(1))
    assert detail is not None and detail["status"] == "failed"
    assert "expired after 2 attempts" in detail["error"]
    assert wl.queue.claim_study("w3", 10, now=41.0) is None
    with pytest.raises(WorklistError, match="unknown study"):
        wl.leases.renew_lease(study(5), "w1", 10)


def test_fail_study_with_and_without_retry(wl: Worklist) -> None:
    for n in (1, 2):
        wl.ingest.record_instance(study(n), sop(n), f"/s/{n}", now=float(n))
    wl.queue.queue_stable_studies(0, now=3.0)
    a = wl.queue.claim_study("w", 10, now=4.0)
    assert a is not None and a.study_uid == study(1)
    assert wl.queue.fail_study(study(1), "w", "CUDA out of memory", retry=True, now=5.0) == "queued"
    b = wl.queue.claim_study("w", 10, now=6.0)
    assert b is not None and b.study_uid == study(1) and b.attempts == 2
    # no claims left (max_attempts=2): failed even with retry
    assert wl.queue.fail_study(study(1), "w", "again", retry=True, now=7.0) == "failed"
    c = wl.queue.claim_study("w", 10, now=8.0)
    assert c is not None and c.study_uid == study(2)
    assert wl.queue.fail_study(study(2), "w", "unreadable", now=9.0) == "failed"
    with pytest.raises(WorklistError):
        wl.queue.fail_study(study(2), "w", "twice", now=10.0)
    failed = wl.queries.list_worklist(status="failed", now=11.0)
    assert {r["study_uid"]: r["error"] for r in failed} == {
        study(1): "again",
        study(2): "unreadable",
    }
    # new data gives a failed study a fresh start
    wl.ingest.record_instance(study(2), sop(2, 2), "/s/2b", now=12.0)
    detail = wl.queries.study_detail(study(2))
    assert detail is not None and detail["status"] == "receiving" and detail["attempts"] == 0


def test_backoff_seconds() -> None:
    assert [backoff_seconds(n, 10, 100) for n in (0, 1, 2, 3, 4, 5, 1000)] == [
        10,
        10,
        20,
        40,
        80,
        100,
        100,
    ]
    with pytest.raises(ValueError):
        backoff_seconds(1, 0, 10)
    with pytest.raises(ValueError):
        backoff_seconds(1, 20, 10)


def test_deliveries_backoff_and_failure(tmp_path: Path) -> None:
    wl = Worklist(
        Worklist.sqlite_url(tmp_path),
        max_delivery_attempts=3,
        delivery_backoff_base=10,
        delivery_backoff_cap=15,
    )
    wl.create_all()
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    sr, sc = f"{ROOT}.9.1", f"{ROOT}.9.2"
    d1 = wl.deliveries.add(study(1), sr, "/out/sr.dcm", "PACS@127.0.0.1:11112", now=100.0)
    d2 = wl.deliveries.add(study(1), sc, "/out/sc.dcm", "PACS@127.0.0.1:11112", now=101.0)
    assert wl.deliveries.add(study(1), sr, "/out/sr.dcm", "PACS@127.0.0.1:11112") == d1
    d3 = wl.deliveries.add(study(1), sr, "/out/sr.dcm", "VIEWER@10.0.0.2:104", now=102.0)
    assert len({d1, d2, d3}) == 3
    assert [d.id for d in wl.deliveries.due(now=100.5)] == [d1]
    due = wl.deliveries.due(now=200.0)
    assert [d.id for d in due] == [d1, d2, d3]
    assert due[0].path == Path("/out/sr.dcm") and due[0].status == "pending"

    wl.deliveries.mark_sent(d2, now=200.0)
    assert wl.deliveries.mark_failed(d1, "association rejected", now=200.0) == "pending"
    assert [d.id for d in wl.deliveries.due(now=209.9)] == [d3]  # d1 waits base=10 s
    assert [d.id for d in wl.deliveries.due(now=210.0)] == [d3, d1]  # by next attempt
    assert wl.deliveries.mark_failed(d1, "timeout", now=210.0) == "pending"
    assert [d.id for d in wl.deliveries.due(now=224.9)] == [d3]  # 2nd backoff capped at 15
    row = wl.deliveries.due(now=225.0)[-1]
    assert row.id == d1 and row.attempts == 2 and row.last_error == "timeout"
    assert wl.deliveries.mark_failed(d1, "refused", now=225.0) == "failed"  # 3rd = max
    assert wl.deliveries.mark_failed(d3, "bad AE", permanent=True, now=225.0) == "failed"
    assert wl.deliveries.due(now=10_000.0) == []
    assert wl.queries.delivery_counts_by_status() == {"pending": 0, "sent": 1, "failed": 2}
    assert set(wl.queries.delivery_counts_by_status()) == set(DELIVERY_STATUSES)
    detail = wl.queries.study_detail(study(1))
    assert detail is not None
    by_id = {d["id"]: d for d in detail["deliveries"]}
    assert by_id[d1]["status"] == "failed" and by_id[d1]["attempts"] == 3
    assert by_id[d2]["status"] == "sent" and by_id[d2]["sent_at"] is not None
    assert "path" not in by_id[d1]
    with pytest.raises(WorklistError, match="unknown delivery"):
        wl.deliveries.mark_sent(9999)
    with pytest.raises(WorklistError, match="unknown delivery"):
        wl.deliveries.mark_failed(9999, "x")
    wl.dispose()


def test_explicit_retry_delay_and_claimed_deliveries(wl: Worklist) -> None:
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    d1 = wl.deliveries.add(study(1), f"{ROOT}.9.1", "/o/1", "A@h:1", now=0.0)
    d2 = wl.deliveries.add(study(1), f"{ROOT}.9.2", "/o/2", "A@h:1", now=0.0)
    claimed = wl.deliveries.claim_due(60, now=1.0, limit=1)
    assert [d.id for d in claimed] == [d1]
    assert [d.id for d in wl.deliveries.claim_due(60, now=2.0)] == [d2]
    assert wl.deliveries.claim_due(60, now=3.0) == []  # both reserved
    assert [d.id for d in wl.deliveries.due(now=61.0)] == [d1]  # reservation lapsed
    assert wl.deliveries.mark_failed(d1, "busy", retry_in_seconds=5, now=61.0) == "pending"
    wl.deliveries.mark_sent(d2, now=61.5)
    assert wl.deliveries.due(now=65.9) == []
    assert [d.id for d in wl.deliveries.due(now=66.0)] == [d1]


def test_concurrent_claims_with_threads(wl: Worklist) -> None:
    for n in range(20):
        wl.ingest.record_instance(study(n), sop(n), f"/s/{n}", now=float(n))
    assert len(wl.queue.queue_stable_studies(0, now=100.0)) == 20
    claims: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def worker(name: str) -> None:
        try:
            barrier.wait()
            while (claimed := wl.queue.claim_study(name, 60)) is not None:
                with lock:
                    claims.append(claimed.study_uid)
                wl.queue.complete_study(claimed.study_uid, name, result_for(claimed.study_uid, 5.0))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert Counter(claims) == Counter(study(n) for n in range(20))
    assert wl.queries.counts_by_status()["done"] == 20


def test_complete_study_registers_deliveries_atomically(wl: Worklist) -> None:
    sr, sc = f"{ROOT}.9.1", f"{ROOT}.9.2"
    outputs = [(sr, "/out/sr.dcm", "PACS@h:104"), (sc, "/out/sc.dcm", "PACS@h:104")]
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    wl.queue.queue_stable_studies(0, now=0.0)
    assert wl.queue.claim_study("w1", 10, now=1.0) is not None
    wl.leases.recover_expired_leases(now=20.0)  # w1 lost its lease
    with pytest.raises(WorklistError, match="no longer holds"):
        wl.queue.complete_study(
            study(1), "w1", result_for(study(1), 60.0), now=21.0, deliveries=outputs
        )
    assert wl.deliveries.due(now=100.0) == []  # neither result nor deliveries stored
    assert wl.queue.claim_study("w2", 10, now=22.0) is not None
    status = wl.queue.complete_study(
        study(1), "w2", result_for(study(1), 60.0), now=23.0, deliveries=outputs
    )
    assert status == "done"
    due = wl.deliveries.due(now=23.0)
    assert [(d.sop_uid, d.path, d.destination) for d in due] == [
        (sr, Path("/out/sr.dcm"), "PACS@h:104"),
        (sc, Path("/out/sc.dcm"), "PACS@h:104"),
    ]
    with pytest.raises(InvalidUIDError):
        wl.queue.complete_study(
            study(1), "w2", result_for(study(1), 1.0), deliveries=[("bad uid", "/x", "A@h:1")]
        )


def test_complete_study_refuses_repeated_findings(wl: Worklist) -> None:
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    wl.queue.queue_stable_studies(0, now=0.0)
    assert wl.queue.claim_study("w", 10, now=1.0) is not None
    finding = Finding("Effusion", 0.5, 0.5, True)
    twice = StudyResult(study(1), "done", findings=(finding, finding), priority_score=50.0)
    with pytest.raises(WorklistError, match="repeats a finding"):
        wl.queue.complete_study(study(1), "w", twice, now=2.0)
    image = ImageResult(sop(1), True)
    images = StudyResult(study(1), "done", images=(image, image))
    with pytest.raises(WorklistError, match="repeats an image"):
        wl.queue.complete_study(study(1), "w", images, now=2.0)
    assert wl.queries.counts_by_status()["processing"] == 1  # nothing changed


def test_rerun_resets_attempts(wl: Worklist) -> None:
    # max_attempts=2: without the reset, the second claim would be the last one
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    wl.queue.queue_stable_studies(0, now=0.0)
    assert wl.queue.claim_study("w", 10, now=1.0) is not None
    wl.ingest.record_instance(study(1), sop(1, 2), "/s/2", now=2.0)
    assert wl.queue.fail_study(study(1), "w", "oops", now=3.0) == "receiving"
    detail = wl.queries.study_detail(study(1))
    assert detail is not None and detail["attempts"] == 0 and detail["error"] == "oops"


def test_committed_instance_is_visible_to_another_connection(tmp_path: Path, wl: Worklist) -> None:
    """record_instance returns only after its commit: a separate connection sees the row."""
    assert wl.ingest.record_instance(study(1), sop(1), "/s/1")
    raw = sqlite3.connect(tmp_path / "storage" / "worklist.sqlite3")
    try:
        rows = raw.execute("SELECT sop_uid, study_uid, path FROM instances").fetchall()
    finally:
        raw.close()
    assert rows == [(sop(1), study(1), "/s/1")]


def test_schema_version_is_checked(tmp_path: Path, wl: Worklist) -> None:
    raw = sqlite3.connect(tmp_path / "storage" / "worklist.sqlite3")
    try:
        assert raw.execute("SELECT value FROM worklist_meta").fetchall() == [(str(SCHEMA_VERSION),)]
        raw.execute("UPDATE worklist_meta SET value = '999'")
        raw.commit()
    finally:
        raw.close()
    with pytest.raises(WorklistError, match="schema version 999"):
        wl.create_all()


def _sqlite_claimer(url: str, name: str, start: float, out: multiprocessing.Queue) -> None:
    worklist = Worklist(url)
    uids: list[str] = []
    try:
        while time.time() < start:
            time.sleep(0.005)
        while (claimed := worklist.queue.claim_study(name, 60)) is not None:
            uids.append(claimed.study_uid)
            worklist.queue.complete_study(
                claimed.study_uid, name, result_for(claimed.study_uid, 1.0)
            )
        out.put((uids, ""))
    except WorklistError as exc:
        out.put((uids, str(exc)))
    finally:
        worklist.dispose()


def test_concurrent_claims_from_processes(tmp_path: Path) -> None:
    url = Worklist.sqlite_url(tmp_path)
    wl = Worklist(url)
    wl.create_all()
    wl.ingest.record_instances(
        [InstanceRecord(study(n), sop(n), f"/s/{n}") for n in range(20)], now=0.0
    )
    assert len(wl.queue.queue_stable_studies(0, now=1.0)) == 20
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_sqlite_claimer, args=(url, f"p{i}", start, out)) for i in range(3)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert [err for _, err in results] == ["", "", ""]
    claims = Counter(uid for uids, _ in results for uid in uids)
    assert claims == Counter(study(n) for n in range(20))
    assert wl.queries.counts_by_status()["done"] == 20
    wl.dispose()
