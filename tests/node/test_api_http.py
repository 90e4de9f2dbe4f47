"""The read-only HTTP API and Prometheus metrics, through TestClient and a real uvicorn server."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.metrics import Metrics
from dicom_node.web.api import create_app
from triage_core.spec import Finding, ImageResult, StudyResult
from triage_core.worklist import Worklist

ROOT = "1.2.826.0.1.3680043.8.498"
NOW = time.time()


def study(n: int) -> str:
    return f"{ROOT}.1.{n}"


def sop(n: int, k: int = 1) -> str:
    return f"{ROOT}.2.{n}.{k}"


def finish(wl: Worklist, n: int, score: float, level: str, t: float, status: str = "done") -> None:
    wl.ingest.record_instance(
        study(n), sop(n), f"/spool/{n}.dcm", series_uid=f"{ROOT}.3.{n}", now=t
    )
    wl.queue.queue_stable_studies(1, now=t + 1)
    claimed = wl.queue.claim_study("w", 60, now=t + 1)
    assert claimed is not None and claimed.study_uid == study(n)
    eligible = status == "done"
    result = StudyResult(
        study_uid=study(n),
        status=status,
        reason="" if eligible else "lateral view",
        findings=(
            (
                Finding("Effusion", score / 100, 0.5, score >= 50, sop(n)),
                Finding("Infiltration", 0.2, 0.4, False, sop(n)),
            )
            if eligible
            else ()
        ),
        priority_score=score,
        priority_level=level,
        images=(
            ImageResult(
                sop(n),
                eligible,
                "" if eligible else "lateral view",
                {"Effusion": score / 100} if eligible else {},
            ),
        ),
        model_name="random-test-model",
        model_version="0",
        timings={"inference": 0.25, "cam": 0.5},
    )
    wl.queue.complete_study(study(n), "w", result, now=t + 2)


@pytest.fixture()
def populated(tmp_path: Path) -> Iterator[Worklist]:
    wl = Worklist(Worklist.sqlite_url(tmp_path))
    wl.create_all()
    finish(wl, 1, 20.0, "routine", NOW - 7200)  # old routine study
    finish(wl, 2, 95.0, "critical", NOW - 600)
    finish(wl, 3, 60.0, "urgent", NOW - 300)
    finish(wl, 4, 0.0, "routine", NOW - 200, status="not_eligible")
    wl.ingest.record_instance(study(5), sop(5), "/spool/5.dcm", now=NOW - 100)  # receiving
    wl.ingest.record_instance(study(6), sop(6), "/spool/6.dcm", now=NOW - 100)
    wl.queue.queue_stable_studies(10, now=NOW - 50)  # 5 and 6 queued
    wl.queue.claim_study("w", 600, now=NOW)  # 5 processing
    d_sent = wl.deliveries.add(study(2), f"{ROOT}.9.1", "/outbox/sr.dcm", "PACS@127.0.0.1:104")
    d_fail = wl.deliveries.add(study(2), f"{ROOT}.9.2", "/outbox/sc.dcm", "PACS@127.0.0.1:104")
    wl.deliveries.mark_sent(d_sent)
    wl.deliveries.mark_failed(d_fail, "association rejected", permanent=True)
    yield wl
    wl.dispose()


def no_aging(score: float, waited: float) -> float:
    return score


@pytest.fixture()
def client(populated: Worklist) -> Iterator[TestClient]:
    with TestClient(create_app(populated, aging=no_aging)) as test_client:
        yield test_client


def test_worklist_endpoint_order_and_filters(client: TestClient) -> None:
    response = client.get("/api/worklist")
    assert response.status_code == 200
    body = response.json()
    uids = [row["study_uid"] for row in body["items"]]
    assert body["count"] == 6
    assert uids == [study(n) for n in (2, 3, 1, 4, 5, 6)]
    top = body["items"][0]
    assert top["priority_score"] == 95.0 and top["priority_level"] == "critical"
    assert top["findings"]["Effusion"] == {"probability": 0.95, "present": True}
    assert top["status"] == "done" and top["reason"] == "" and top["num_instances"] == 1
    assert top["received_at"].endswith("Z")
    assert body["items"][3]["reason"] == "lateral view"

    limited = client.get("/api/worklist", params={"limit": 2}).json()
    assert [r["study_uid"] for r in limited["items"]] == [study(2), study(3)]
    queued = client.get("/api/worklist", params={"status": "queued"}).json()
    assert [r["study_uid"] for r in queued["items"]] == [study(6)]
    several = client.get("/api/worklist", params={"status": "queued,processing"}).json()
    assert {r["study_uid"] for r in several["items"]} == {study(5), study(6)}
    urgent = client.get("/api/worklist", params={"min_priority": "urgent"}).json()
    assert [r["study_uid"] for r in urgent["items"]] == [study(2), study(3)]
    numeric = client.get("/api/worklist", params={"min_priority": "61"}).json()
    assert [r["study_uid"] for r in numeric["items"]] == [study(2)]


@pytest.mark.parametrize(
    "params",
    [
        {"status": "archived"},
        {"status": ","},
        {"min_priority": "stat"},
        {"min_priority": "nan"},
        {"limit": "0"},
        {"limit": "100000"},
        {"limit": "ten"},
    ],
)
def test_worklist_endpoint_rejects_bad_parameters(client: TestClient, params: dict) -> None:
    response = client.get("/api/worklist", params=params)
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/json")
    assert "detail" in response.json()


def test_default_aging_rule_orders_like_the_worklist(populated: Worklist) -> None:
    from triage_core.priority import AgingRule

    with TestClient(create_app(populated)) as test_client:
        rows = test_client.get("/api/worklist").json()["items"]
    expected = populated.queries.list_worklist(aging=AgingRule())
    assert [r["study_uid"] for r in rows] == [r["study_uid"] for r in expected]
    assert rows[0]["effective_priority"] >= rows[0]["priority_score"]
    # the old routine study waited two hours: aging raised its effective priority
    old = next(r for r in rows if r["study_uid"] == study(1))
    assert old["effective_priority"] > old["priority_score"]


def test_study_endpoint(client: TestClient) -> None:
    response = client.get(f"/api/studies/{study(2)}")
    assert response.status_code == 200
    detail = response.json()
    assert detail["study_uid"] == study(2) and detail["status"] == "done"
    assert detail["findings"]["Effusion"] == {
        "probability": 0.95,
        "present": True,
        "threshold": 0.5,
        "source_uid": sop(2),
    }
    assert detail["findings"]["Infiltration"]["present"] is False
    assert detail["images"] == [
        {
            "sop_uid": sop(2),
            "series_uid": f"{ROOT}.3.2",
            "sop_class_uid": "",
            "received_at": detail["images"][0]["received_at"],
            "eligible": True,
            "reason": "",
            "probabilities": {"Effusion": 0.95},
            "error": "",
        }
    ]
    deliveries = {d["sop_uid"]: d for d in detail["deliveries"]}
    assert deliveries[f"{ROOT}.9.1"]["status"] == "sent"
    assert deliveries[f"{ROOT}.9.2"]["status"] == "failed"
    assert deliveries[f"{ROOT}.9.2"]["last_error"] == "association rejected"
    assert detail["timings"] == {"inference": 0.25, "cam": 0.5}
    assert "path" not in str(detail)  # spool paths stay internal
    processing = client.get(f"/api/studies/{study(5)}").json()
    assert processing["status"] == "processing" and processing["lease_owner"] == "w"
    assert processing["findings"] == {} and processing["images"][0]["eligible"] is None


def test_study_endpoint_errors(client: TestClient) -> None:
    missing = client.get(f"/api/studies/{ROOT}.1.999")
    assert missing.status_code == 404
    assert missing.json() == {"detail": f"study {ROOT}.1.999 not found"}
    for bad in ("1.02.3", "abc", "1." + "2" * 70, "1..2"):
        response = client.get(f"/api/studies/{bad}")
        assert response.status_code == 422, bad
        assert "not a valid DICOM UID" in response.json()["detail"]
    assert client.post("/api/worklist").status_code == 405  # read-only
    assert client.delete(f"/api/studies/{study(2)}").status_code == 405


def test_openapi_document(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert {"/api/worklist", "/api/studies/{study_uid}", "/healthz", "/metrics"} <= set(
        doc["paths"]
    )
    assert "StudyDetail" in doc["components"]["schemas"]
    assert set(doc["paths"]["/api/worklist"]) == {"get"}


def test_healthz_and_database_errors(client: TestClient, tmp_path: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok", "model": "ready"}
    assert client.get("/healthz/live").json() == {"status": "live"}
    assert client.get("/healthz/ready").status_code == 200  # no workers here: nothing to load
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    broken = Worklist(f"sqlite+pysqlite:///{blocker}/worklist.sqlite3")
    with TestClient(create_app(broken, aging=None)) as bad_client:
        health = bad_client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert bad_client.get("/healthz/live").status_code == 200  # alive, not ready
        assert bad_client.get("/healthz/ready").status_code == 503
        listing = bad_client.get("/api/worklist")
        assert listing.status_code == 503
        assert listing.json() == {"detail": "worklist database unavailable"}
        metrics_text = bad_client.get("/metrics").text
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
    }
    assert values[("triage_database_up", ())] == 0.0
    assert ("triage_queue_depth", ()) not in values


def test_metrics_endpoint_values(populated: Worklist) -> None:
    metrics = Metrics()
    other = Metrics()  # a second registry in the same process does not clash
    other.instances_received.inc(100)
    metrics.instances_received.inc(3)
    metrics.instances_rejected.labels(reason="undecodable").inc()
    metrics.studies_processed.labels(status="done").inc(2)
    metrics.inference_seconds.observe(0.3)
    metrics.inference_seconds.observe(1.7)
    metrics.deliveries_sent.inc()
    metrics.deliveries_failed.inc(2)
    with TestClient(create_app(populated, metrics, aging=None)) as test_client:
        response = test_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert values[("triage_instances_received_total", ())] == 3.0
    assert values[("triage_instances_rejected_total", (("reason", "undecodable"),))] == 1.0
    assert values[("triage_studies_processed_total", (("status", "done"),))] == 2.0
    assert values[("triage_inference_seconds_count", ())] == 2.0
    assert values[("triage_inference_seconds_sum", ())] == pytest.approx(2.0)
    assert values[("triage_inference_seconds_bucket", (("le", "0.5"),))] == 1.0
    assert values[("triage_deliveries_sent_total", ())] == 1.0
    assert values[("triage_deliveries_failed_total", ())] == 2.0
    assert values[("triage_database_up", ())] == 1.0
    assert values[("triage_queue_depth", ())] == 1.0
    expected_studies = {
        "receiving": 0,
        "queued": 1,
        "processing": 1,
        "done": 3,
        "not_eligible": 1,
        "failed": 0,
    }
    for status, n in expected_studies.items():
        assert values[("triage_studies", (("status", status),))] == float(n), status
    assert values[("triage_deliveries", (("status", "failed"),))] == 1.0
    assert values[("triage_deliveries", (("status", "sent"),))] == 1.0
    assert values[("triage_deliveries", (("status", "pending"),))] == 0.0
    # the gauges follow the database at every scrape
    populated.ingest.record_instance(study(7), sop(7), "/spool/7.dcm")
    body, _ = metrics.render()
    assert 'triage_studies{status="receiving"} 1.0' in body.decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_real_uvicorn_server(populated: Worklist) -> None:
    import uvicorn

    port = _free_port()
    app = create_app(populated, Metrics(), aging=no_aging)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert thread.is_alive(), "uvicorn exited"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/healthz").json()["status"] == "ok"
            rows = http.get("/api/worklist", params={"limit": 3}).json()["items"]
            assert [r["study_uid"] for r in rows] == [study(2), study(3), study(1)]
            assert http.get(f"/api/studies/{study(3)}").json()["priority_level"] == "urgent"
            assert http.get(f"/api/studies/{ROOT}.1.404").status_code == 404
            assert "triage_queue_depth 1.0" in http.get("/metrics").text
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive()


def test_healthz_ready_follows_the_model(tmp_path: Path) -> None:
    states = iter(["loading", "ready", "failed: CheckpointError: no graph"])
    worklist = Worklist(f"sqlite+pysqlite:///{tmp_path}/w.sqlite3")
    worklist.create_all()
    with TestClient(create_app(worklist, aging=None, readiness=lambda: next(states))) as http:
        loading = http.get("/healthz/ready")
        assert loading.status_code == 503 and loading.json()["model"] == "loading"
        assert http.get("/healthz/ready").status_code == 200
        failed = http.get("/healthz")
        assert failed.status_code == 200 and failed.json()["model"].startswith("failed")
    worklist.dispose()
