"""Wake-ups instead of polling, and one-statement lease renewal.

In one process the worklist fires threading signals after each commit that makes work; across
processes on PostgreSQL the same transaction sends NOTIFY and each process's listener (LISTEN on
its own connection) wakes its waiters. The PostgreSQL tests use the real throwaway server.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from triage_core.errors import WorklistError
from triage_core.spec import Finding, ImageResult, StudyResult
from triage_core.worklist import InstanceRecord, Waiter, Worklist

ROOT = "1.2.826.0.1.3680043.8.498"
POLL_INTERVAL = 0.2  # the service's default scheduler_interval, which these wake-ups replace


def study(n: int) -> str:
    return f"{ROOT}.1.{n}"


def sop(n: int, k: int = 1) -> str:
    return f"{ROOT}.2.{n}.{k}"


def done(study_uid: str) -> StudyResult:
    return StudyResult(
        study_uid=study_uid,
        status="done",
        findings=(Finding("Effusion", 0.9, 0.5, True, sop(0)),),
        priority_score=90.0,
        priority_level="critical",
        images=(ImageResult(sop(0), True, "", {"Effusion": 0.9}),),
        model_name="m",
        model_version="1",
    )


@pytest.fixture()
def wl(tmp_path: Path) -> Iterator[Worklist]:
    worklist = Worklist(Worklist.sqlite_url(tmp_path), max_attempts=2, max_delivery_attempts=3)
    worklist.create_all()
    yield worklist
    worklist.dispose()


def queued(worklist: Worklist, n: int, t: float = 0.0) -> None:
    worklist.ingest.record_instance(study(n), sop(n), f"/s/{n}", now=t)
    assert worklist.queue.queue_stable_studies(0, now=t) == [study(n)]


def wake_in_thread(waiter: Waiter, timeout: float) -> tuple[threading.Thread, list[float | bool]]:
    """Start a thread blocked in ``waiter.wait``; it records (woken, time.perf_counter())."""
    out: list[float | bool] = []
    started = threading.Event()

    def run() -> None:
        started.set()
        woken = waiter.wait(timeout)
        out.extend([woken, time.perf_counter()])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(5)
    time.sleep(0.05)  # let it block
    return thread, out


# ---------------------------------------------------------------- in-process signals (SQLite)
def test_waiter_times_out_when_nothing_happens(wl: Worklist) -> None:
    waiter = wl.queue.waiter()
    started = time.monotonic()
    assert waiter.wait(0.1) is False
    assert time.monotonic() - started >= 0.09


def test_blocked_worker_wakes_when_a_study_is_queued(wl: Worklist) -> None:
    waiter = wl.queue.waiter()
    thread, out = wake_in_thread(waiter, timeout=10.0)
    t0 = time.perf_counter()
    queued(wl, 1)
    thread.join(10)
    assert out[0] is True
    assert float(out[1]) - t0 < POLL_INTERVAL / 2
    assert wl.queue.claim_study("w", 60) is not None


def test_no_wake_up_is_lost_between_claim_and_wait(wl: Worklist) -> None:
    """Work announced while the worker was busy claiming makes its next wait return at once."""
    waiter = wl.queue.waiter()
    assert wl.queue.claim_study("w", 60, now=0.0) is None  # nothing yet
    queued(wl, 1)  # announced before the worker gets to wait
    started = time.monotonic()
    assert waiter.wait(10.0) is True
    assert time.monotonic() - started < 1.0
    assert waiter.wait(0.05) is False  # consumed: the next wait blocks again


def test_every_waiter_wakes(wl: Worklist) -> None:
    waiters = [wl.queue.waiter() for _ in range(3)]
    runs = [wake_in_thread(w, timeout=10.0) for w in waiters]
    queued(wl, 1)
    for thread, out in runs:
        thread.join(10)
        assert out and out[0] is True


def test_requeues_wake_workers(wl: Worklist) -> None:
    queued(wl, 1)
    waiter = wl.queue.waiter()
    claimed = wl.queue.claim_study("w", 10, now=1.0)
    assert claimed is not None
    assert wl.queue.fail_study(study(1), "w", "transient", retry=True, now=2.0) == "queued"
    assert waiter.wait(0) is True
    wl.queue.claim_study("w", 10, now=3.0)
    assert wl.leases.recover_expired_leases(now=20.0).failed == (study(1),)  # 2 of 2 attempts
    assert waiter.wait(0) is False  # failed for good: nothing claimable
    queued(wl, 2, t=30.0)
    waiter.wait(0)
    wl.queue.claim_study("w", 10, now=31.0)
    assert wl.leases.recover_expired_leases(now=50.0).requeued == (study(2),)
    assert waiter.wait(0) is True


def test_delivery_waiter(wl: Worklist) -> None:
    waiter = wl.deliveries.waiter()
    queued(wl, 1)
    wl.queue.claim_study("w", 60, now=1.0)
    assert waiter.wait(0) is False  # a claim is not a delivery
    thread, out = wake_in_thread(waiter, timeout=10.0)
    deliveries = [(f"{ROOT}.9.1", "/o/1", "PACS@127.0.0.1:104")]
    wl.queue.complete_study(study(1), "w", done(study(1)), now=2.0, deliveries=deliveries)
    thread.join(10)
    assert out[0] is True
    [row] = wl.deliveries.claim_due(30, now=3.0)
    assert wl.deliveries.mark_failed(row.id, "refused", now=4.0) == "pending"  # backoff: later
    assert waiter.wait(0) is False
    assert wl.deliveries.next_due_in(now=4.0) == pytest.approx(30.0)
    assert wl.deliveries.mark_failed(row.id, "refused", retry_in_seconds=0, now=5.0) == "pending"
    assert waiter.wait(0) is True  # due again at once
    assert wl.deliveries.next_due_in(now=5.0) == 0.0
    wl.deliveries.add(study(1), f"{ROOT}.9.2", "/o/2", "PACS@127.0.0.1:104", now=6.0)
    assert waiter.wait(0) is True


def test_instance_waiter_and_next_stable(wl: Worklist) -> None:
    waiter = wl.queue.instance_waiter()
    assert wl.queue.next_stable_in(5.0, now=0.0) is None
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=10.0)
    assert waiter.wait(0) is True
    wl.ingest.record_instance(study(1), sop(1), "/s/1", now=11.0)  # a repeat is not news
    assert waiter.wait(0) is False
    assert wl.queue.next_stable_in(5.0, now=12.0) == pytest.approx(3.0)
    assert wl.queue.next_stable_in(5.0, now=20.0) == 0.0
    assert wl.deliveries.next_due_in(now=0.0) is None


def test_sqlite_needs_no_listener(wl: Worklist) -> None:
    assert wl.start_listening() is True
    assert wl.wakeups.listening is False
    with pytest.raises(ValueError, match="unknown channel"):
        wl.wakeups.waiter("nope")


# ---------------------------------------------------------------- one-statement lease renewal
def test_renew_leases_of_one_worker_process(wl: Worklist) -> None:
    wl.ingest.record_instances(
        [InstanceRecord(study(n), sop(n), f"/s/{n}") for n in range(4)], now=0.0
    )
    wl.queue.queue_stable_studies(0, now=0.0)
    owners = ["node/w0", "node/w1", "node/w0", "other/w0"]
    claims = [wl.queue.claim_study(owner, 10, now=1.0) for owner in owners]
    assert all(c is not None for c in claims)
    assert wl.leases.renew_leases("node/w0", 10, now=5.0) == sorted([study(0), study(2)])
    assert wl.leases.renew_leases(["node/w0", "node/w1"], 10, now=8.0) == sorted(
        [study(0), study(1), study(2)]
    )
    # at t=12 only other/w0's lease (expiry 11) has run out
    assert wl.leases.recover_expired_leases(now=12.0).requeued == (study(3),)
    assert wl.leases.renew_leases("other/w0", 10, now=12.0) == []  # no longer held: not renewed
    detail = wl.queries.study_detail(study(1))
    assert detail is not None and detail["lease_expires_at"] == "1970-01-01T00:00:18Z"
    with pytest.raises(WorklistError, match="worker id"):
        wl.leases.renew_leases([], 10)
    with pytest.raises(WorklistError, match="lease_seconds"):
        wl.leases.renew_leases("node/w0", 0)


# ---------------------------------------------------------------- PostgreSQL LISTEN/NOTIFY
@pytest.fixture()
def pg_pair(postgres_database: str) -> Iterator[tuple[Worklist, Worklist]]:
    """Two worklists on one database: separate engines, separate LISTEN connections."""
    producer = Worklist(postgres_database)
    producer.create_all()
    consumer = Worklist(postgres_database)
    yield producer, consumer
    consumer.dispose()
    producer.dispose()


@pytest.mark.postgres
def test_notify_wakes_a_waiter_on_another_connection(pg_pair: tuple[Worklist, Worklist]) -> None:
    producer, consumer = pg_pair
    assert consumer.start_listening(timeout=10) is True and consumer.wakeups.listening
    waiter = consumer.queue.waiter()
    latencies = []
    for n in range(5):
        producer.ingest.record_instance(study(n), sop(n), f"/s/{n}", now=float(n))
        thread, out = wake_in_thread(waiter, timeout=10.0)
        t0 = time.perf_counter()
        assert producer.queue.queue_stable_studies(0, now=float(n)) == [
            study(n)
        ]  # NOTIFY at commit
        thread.join(10)
        assert out[0] is True  # woken by the notification, not by the 10 s timeout
        latencies.append(float(out[1]) - t0)  # includes the notifying transaction itself
        claimed = consumer.queue.claim_study("consumer", 60)
        assert claimed is not None and claimed.study_uid == study(n)
    print(f"NOTIFY wake-up latency (s): {sorted(round(x, 4) for x in latencies)}")
    assert statistics.median(latencies) < POLL_INTERVAL / 2, latencies
    assert max(latencies) < POLL_INTERVAL, latencies


@pytest.mark.postgres
def test_notify_is_sent_at_commit_only(pg_pair: tuple[Worklist, Worklist]) -> None:
    producer, consumer = pg_pair
    consumer.start_listening(timeout=10)
    waiter = consumer.deliveries.waiter()
    producer.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
    producer.queue.queue_stable_studies(0, now=0.0)
    producer.queue.claim_study("w", 60, now=1.0)
    bad = [(f"{ROOT}.9.1", "/o/1", "")]  # an empty destination: refused before any write
    with pytest.raises(WorklistError):
        producer.queue.complete_study(study(1), "w", done(study(1)), deliveries=bad)
    assert waiter.wait(0.3) is False
    good = [(f"{ROOT}.9.1", "/o/1", "PACS@127.0.0.1:104")]
    producer.queue.complete_study(study(1), "w", done(study(1)), deliveries=good)
    assert waiter.wait(5.0) is True
    assert [d.sop_uid for d in consumer.deliveries.claim_due(30)] == [f"{ROOT}.9.1"]


@pytest.mark.postgres
def test_listener_reconnects_after_its_connection_is_killed(
    pg_pair: tuple[Worklist, Worklist],
) -> None:
    producer, consumer = pg_pair
    assert consumer.start_listening(timeout=10)
    waiter = consumer.queue.waiter()
    with producer.engine.begin() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'cxr-triage-listen'"
            )
        ).scalar_one()
    assert killed == 1
    # after reconnecting, the listener wakes every waiter once (notifications may be lost)
    assert waiter.wait(10.0) is True
    deadline = time.monotonic() + 10
    while not consumer.wakeups.listening and time.monotonic() < deadline:
        time.sleep(0.05)
    waiter.wait(0)
    thread, out = wake_in_thread(waiter, timeout=10.0)
    queued(producer, 1)
    thread.join(10)
    assert out[0] is True


@pytest.mark.postgres
def test_dispose_stops_the_listener_for_good(postgres_database: str) -> None:
    worklist = Worklist(postgres_database)
    worklist.create_all()
    assert worklist.start_listening(timeout=10) and worklist.wakeups.listening
    waiter = worklist.queue.waiter()
    worklist.dispose()
    assert not worklist.wakeups.listening
    assert waiter.wait(0.05) is False  # falls back to its timeout, starts no new listener
    assert not worklist.wakeups.listening
    assert not [t for t in threading.enumerate() if t.name == "worklist-listen" and t.is_alive()]


def _wait_in_child(url: str, ready: multiprocessing.Event, out: multiprocessing.Queue) -> None:
    worklist = Worklist(url)
    try:
        worklist.start_listening(timeout=10)
        waiter = worklist.queue.waiter()
        ready.set()
        woken = waiter.wait(10.0)
        out.put((woken, time.time()))
    finally:
        worklist.dispose()


@pytest.mark.postgres
def test_notify_wakes_a_worker_process(postgres_database: str) -> None:
    producer = Worklist(postgres_database)
    producer.create_all()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    out: multiprocessing.Queue = ctx.Queue()
    child = ctx.Process(target=_wait_in_child, args=(postgres_database, ready, out))
    child.start()
    try:
        assert ready.wait(30)
        producer.ingest.record_instance(study(1), sop(1), "/s/1", now=0.0)
        time.sleep(0.1)  # the child is blocked in wait()
        t0 = time.time()
        producer.queue.queue_stable_studies(0, now=0.0)
        woken, at = out.get(timeout=30)
        child.join(30)
        assert child.exitcode == 0
        assert woken is True
        assert at - t0 < POLL_INTERVAL, at - t0
    finally:
        if child.is_alive():
            child.kill()
        producer.dispose()
