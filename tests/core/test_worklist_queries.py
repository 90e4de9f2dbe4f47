"""The worklist's read side on SQLite: ordering, filters, aging, purge."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_worklist_support import ROOT, run_to_done, sop, study

from triage_core.errors import WorklistError
from triage_core.worklist import Worklist


@pytest.fixture()
def wl(tmp_path: Path) -> Iterator[Worklist]:
    worklist = Worklist(Worklist.sqlite_url(tmp_path / "storage"), max_attempts=2)
    worklist.create_all()
    yield worklist
    worklist.dispose()


def test_worklist_ordering_and_filters(wl: Worklist) -> None:
    run_to_done(wl, 1, 30.0, "routine", t=0.0)
    run_to_done(wl, 2, 90.0, "critical", t=100.0)
    run_to_done(wl, 3, 60.0, "urgent", t=200.0)
    run_to_done(wl, 4, 60.0, "urgent", t=300.0)
    wl.ingest.record_instance(study(5), sop(5), "/s/5", now=400.0)  # still receiving, unscored
    rows = wl.queries.list_worklist(now=500.0)
    assert [r["study_uid"] for r in rows] == [study(n) for n in (2, 3, 4, 1, 5)]
    assert rows[0]["effective_priority"] == 90.0 and rows[-1]["effective_priority"] is None
    assert rows[0]["findings"]["Effusion"] == {"probability": 0.9, "present": True}
    assert rows[0]["received_at"] == "1970-01-01T00:01:40Z"
    assert set(rows[0]) >= {
        "study_uid",
        "status",
        "reason",
        "priority_score",
        "effective_priority",
        "priority_level",
        "findings",
        "received_at",
        "updated_at",
        "accession_hash",
    }
    assert [r["study_uid"] for r in wl.queries.list_worklist(limit=2, now=500.0)] == [
        study(2),
        study(3),
    ]
    assert [r["study_uid"] for r in wl.queries.list_worklist(status="receiving")] == [study(5)]
    assert len(wl.queries.list_worklist(status=["done", "receiving"])) == 5
    high = wl.queries.list_worklist(min_priority=60, now=500.0)
    assert [r["study_uid"] for r in high] == [study(2), study(3), study(4)]
    urgent = wl.queries.list_worklist(min_priority="urgent", now=500.0)
    assert [r["study_uid"] for r in urgent] == [study(2), study(3), study(4)]
    assert [r["study_uid"] for r in wl.queries.list_worklist(min_priority="critical")] == [study(2)]
    with pytest.raises(WorklistError, match="unknown status"):
        wl.queries.list_worklist(status="archived")
    with pytest.raises(WorklistError, match="priority level"):
        wl.queries.list_worklist(min_priority="stat")
    with pytest.raises(WorklistError, match="limit"):
        wl.queries.list_worklist(limit=0)

    # Aging: one point per 10 s waited since arrival. Study 1 (score 30, waited 500 s -> 80)
    # now outranks studies 3 and 4 (60 + 30, 60 + 20 = 90 and 80; 4 arrived later).
    def aging(score: float, waited: float) -> float:
        return score + waited / 10.0

    aged = wl.queries.list_worklist(aging=aging, now=500.0)
    assert [r["study_uid"] for r in aged] == [study(n) for n in (2, 3, 1, 4, 5)]
    assert [r["effective_priority"] for r in aged] == [130.0, 90.0, 80.0, 80.0, None]
    assert [r["study_uid"] for r in wl.queries.list_worklist(aging=aging, now=500.0, limit=3)] == [
        study(2),
        study(3),
        study(1),
    ]
    filtered = wl.queries.list_worklist(aging=aging, min_priority=85, now=500.0)
    assert [r["study_uid"] for r in filtered] == [study(2), study(3)]
    detail = wl.queries.study_detail(study(1), aging=aging, now=500.0)
    assert detail is not None and detail["effective_priority"] == 80.0


def test_worklist_ordering_with_the_real_aging_rule(wl: Worklist) -> None:
    priority = pytest.importorskip("triage_core.priority")
    rule = priority.AgingRule()
    run_to_done(wl, 1, 50.0, "urgent", t=0.0)
    run_to_done(wl, 2, 50.0, "urgent", t=1000.0)
    now = 5000.0
    rows = wl.queries.list_worklist(aging=rule, now=now)
    expected = [
        priority.effective_priority(50.0, now - 0.0, rule=rule),
        priority.effective_priority(50.0, now - 1000.0, rule=rule),
    ]
    assert [r["effective_priority"] for r in rows] == pytest.approx(expected)
    # equal scores: the older study is never behind the newer one
    assert rows[0]["study_uid"] == study(1)


def test_purge_returns_files_to_delete(wl: Worklist) -> None:
    run_to_done(wl, 1, 10.0, "routine", t=0.0)
    run_to_done(wl, 2, 10.0, "routine", t=0.0)
    wl.ingest.record_instance(study(3), sop(3), "/spool/3.dcm", now=0.0)  # still receiving: kept
    wl.deliveries.add(study(1), f"{ROOT}.9.1", "/outbox/1.dcm", "A@h:1", now=8.0)
    wl.deliveries.add(study(2), f"{ROOT}.9.2", "/outbox/2.dcm", "A@h:1", now=8.0)
    wl.deliveries.mark_sent(wl.deliveries.due(now=9.0)[0].id, now=9.0)  # study 1's
    assert wl.retention.purge(3600, now=100.0) == []  # too recent
    paths = wl.retention.purge(3600, now=10_000.0)
    assert sorted(paths) == [Path("/outbox/1.dcm"), Path("/spool/1.dcm")]
    assert wl.queries.study_detail(study(1)) is None
    assert wl.queries.study_detail(study(2)) is not None  # a pending delivery keeps it
    assert wl.queries.study_detail(study(3)) is not None
    assert wl.ingest.record_instance(study(1), sop(1), "/spool/1.dcm", now=10_001.0) is True
