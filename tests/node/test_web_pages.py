"""The web pages, the access rule, HTTP TLS settings and the offline ``/docs`` (TestClient and a
real uvicorn server; the browser test is test_web_browser.py)."""

from __future__ import annotations

import hmac
import re
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect
from test_api_http import NOW, ROOT, finish, sop, study

from dicom_node import web
from dicom_node.settings import NodeSettings, is_loopback, load_settings
from dicom_node.web import access, views
from dicom_node.web.api import create_app
from triage_core.errors import ConfigError
from triage_core.worklist import Worklist

TOKEN = "s3cret-token-0123456789"


@pytest.fixture()
def wl(tmp_path: Path) -> Iterator[Worklist]:
    w = Worklist(Worklist.sqlite_url(tmp_path))
    w.create_all()
    finish(w, 1, 20.0, "routine", NOW - 7200)
    finish(w, 2, 95.0, "critical", NOW - 600)
    finish(w, 3, 60.0, "urgent", NOW - 300)
    finish(w, 4, 0.0, "routine", NOW - 200, status="not_eligible")
    w.ingest.record_instance(study(5), sop(5), "/spool/5.dcm", now=NOW - 4000)  # receiving, aging
    sent = w.deliveries.add(study(2), f"{ROOT}.9.1", "/outbox/sr.dcm", "PACS@127.0.0.1:104")
    failed = w.deliveries.add(study(2), f"{ROOT}.9.2", "/outbox/sc.dcm", "PACS@127.0.0.1:104")
    w.deliveries.add(study(2), f"{ROOT}.9.1", "/outbox/sr.dcm", "VIEWER@127.0.0.1:105")
    w.deliveries.mark_sent(sent)
    w.deliveries.mark_failed(failed, "association rejected", permanent=True)
    yield w
    w.dispose()


def client(wl: Worklist, tmp_path: Path, **settings: object) -> TestClient:
    s = NodeSettings(storage=tmp_path, **settings)  # type: ignore[arg-type]
    app = create_app(wl)
    web.install(app, s, wl)
    return TestClient(app)


def test_worklist_page_order_badges_findings_deliveries(wl: Worklist, tmp_path: Path) -> None:
    page = client(wl, tmp_path).get("/")
    assert page.status_code == 200
    order = re.findall(r'data-study="([0-9.]+)"', page.text)
    api = [r["study_uid"] for r in wl.queries.list_worklist(limit=100, aging=web_aging())]
    assert order == api and order[0] == study(2)
    row2 = page.text.split(f'data-study="{study(2)}"')[1].split("</tr>")[0]
    assert 'class="badge critical"' in row2
    assert "Effusion <b>0.95</b> / 0.50 +" in row2  # probability against its threshold
    assert 'class="dl failed"' in row2 and "PACS 1/2" in row2  # one sent, one failed
    assert 'class="dl pending"' in row2 and "VIEWER 0/1" in row2
    row4 = page.text.split(f'data-study="{study(4)}"')[1].split("</tr>")[0]
    assert "not eligible" in row4 and "lateral view" in row4
    row5 = page.text.split(f'data-study="{study(5)}"')[1].split("</tr>")[0]
    assert 'class="wait overdue"' in row5  # received 4000 s ago, still receiving
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text  # no inline script: the CSP would block it


def web_aging() -> object:
    from triage_core.priority import AgingRule

    return AgingRule()


def test_filters_and_partial_keep_the_query(wl: Worklist, tmp_path: Path) -> None:
    c = client(wl, tmp_path)
    done = c.get("/partials/worklist?status=done")
    assert set(re.findall(r'data-study="([0-9.]+)"', done.text)) == {study(1), study(2), study(3)}
    urgent = c.get("/?level=urgent")
    assert set(re.findall(r'data-study="([0-9.]+)"', urgent.text)) == {study(2), study(3)}
    assert '<option value="urgent" selected>' in urgent.text
    recent = c.get("/partials/worklist?since=1h")
    assert study(1) not in recent.text and study(2) in recent.text  # study 1: 2 h old
    bogus = c.get("/?status=<script>&level=x&since=forever")  # ignored, never echoed
    assert bogus.status_code == 200 and "<script>" not in bogus.text


def test_study_page_and_errors(wl: Worklist, tmp_path: Path) -> None:
    c = client(wl, tmp_path)
    page = c.get(f"/studies/{study(2)}")
    assert page.status_code == 200
    assert "association rejected" in page.text and "threshold 0.500" in page.text
    assert 'href="/model/card"' in page.text and "random-test-model" in page.text
    assert "No Grad-CAM Secondary Capture" in page.text  # none written in this test
    assert c.get(f"/studies/{study(2)}/overlay.png").status_code == 404
    assert c.get(f"/studies/{ROOT}.1.999").status_code == 404
    assert c.get("/studies/1..2").status_code == 422
    path = f"/studies/{study(2)}/images/..%2F..%2Fetc/{sop(2)}.png"
    assert c.get(path).status_code == 404


def test_docs_are_served_offline(wl: Worklist, tmp_path: Path) -> None:
    c = client(wl, tmp_path)
    docs = c.get("/docs")
    assert docs.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert urls and all(u.startswith("/static/swagger/") for u in urls), urls
    assert "cdn" not in docs.text.lower()
    for url in urls:
        assert c.get(url).status_code == 200, url
    assert c.get("/redoc").status_code == 404  # FastAPI's CDN page is gone
    assert c.get("/openapi.json").json()["paths"]["/api/worklist"]


def test_token_guards_every_route(wl: Worklist, tmp_path: Path) -> None:
    c = client(wl, tmp_path, http_token=TOKEN)
    for path in ("/", "/api/worklist", "/healthz", "/metrics", "/docs", "/static/app.css"):
        rsp = c.get(path)
        assert rsp.status_code == 401, path
        assert TOKEN not in rsp.text
    assert c.get("/api/worklist", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = c.get("/api/worklist", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["count"] == 5
    login = c.get(f"/?status=done&token={TOKEN}", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/?status=done"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert c.get("/?status=done").status_code == 200  # the cookie now opens every page
    c.cookies.clear()
    assert c.get("/?token=wrong", follow_redirects=False).status_code == 401


def test_proxy_header_mode(wl: Worklist, tmp_path: Path) -> None:
    c = client(wl, tmp_path, http_proxy_header="X-Forwarded-User")
    assert c.get("/").status_code == 401
    assert c.get("/", headers={"X-Forwarded-User": "dr.who"}).status_code == 200


def test_websocket_connections_pass_the_same_access_check(wl: Worklist, tmp_path: Path) -> None:
    """The guard is plain ASGI: a WebSocket without a token is closed with 1008 (policy
    violation) before the route accepts it; with one, the route sees its principal."""
    s = NodeSettings(storage=tmp_path, http_token=TOKEN)  # type: ignore[arg-type]
    app = create_app(wl)

    @app.websocket("/ws-probe")
    async def probe(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text(access.principal_of(socket).role)
        await socket.close()

    web.install(app, s, wl)
    c = TestClient(app)
    with pytest.raises(WebSocketDisconnect) as refused, c.websocket_connect("/ws-probe"):
        pass
    assert refused.value.code == 1008
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with c.websocket_connect("/ws-probe", headers=headers) as socket:
        assert socket.receive_text() == "admin"


def test_compare_is_constant_time() -> None:
    guard = access.AccessGuard(TOKEN, None, False)
    assert guard.token == TOKEN.encode()
    assert access._same(TOKEN, guard.token) and not access._same(TOKEN[:-1], guard.token)
    assert access.hmac.compare_digest is hmac.compare_digest


def test_settings_refuse_open_http_without_access(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="http_token"):
        load_settings(None, {"storage": tmp_path, "http_host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="at least 16"):
        load_settings(None, {"storage": tmp_path, "http_host": "0.0.0.0", "http_token": "short"})
    ok = load_settings(None, {"storage": tmp_path, "http_host": "0.0.0.0", "http_token": TOKEN})
    assert ok.http_token is not None and TOKEN not in repr(ok)
    assert load_settings(None, {"http_host": "10.1.2.3", "http_proxy_header": "X-User"})
    assert load_settings(None, {"http_host": "0.0.0.0", "http_port": 0})  # HTTP off
    with pytest.raises(ConfigError, match="go together"):
        load_settings(None, {"http_tls_cert": tmp_path / "c.pem"})
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_tls_options_and_banner_url(tmp_path: Path) -> None:
    plain = NodeSettings(storage=tmp_path)
    assert web.uvicorn_options(plain) == {} and web.base_url(plain) == "http://127.0.0.1:8080"
    tls = NodeSettings(
        storage=tmp_path,
        http_tls_cert=tmp_path / "c.pem",
        http_tls_key=tmp_path / "k.pem",
        http_tls_ca=tmp_path / "ca.pem",
    )
    options = web.uvicorn_options(tls)
    assert options["ssl_certfile"].endswith("c.pem") and options["ssl_cert_reqs"] == 2
    assert web.base_url(tls).startswith("https://")


def test_views_helpers() -> None:
    assert views.duration(42) == "42 s" and views.duration(3 * 3600 + 300) == "3 h 05"
    assert views.short_time("2026-11-30T01:10:51.253925Z") == "2026-11-30 01:10:51Z"


def test_real_server_with_token(wl: Worklist, tmp_path: Path) -> None:
    """uvicorn as HttpApi runs it: pages and API answer only with the token."""
    import uvicorn
    from test_node_support import free_port

    port = free_port()
    s = NodeSettings(storage=tmp_path, http_port=port, http_token=TOKEN)
    app = create_app(wl)
    web.install(app, s, wl)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/", timeout=10).status_code == 401
        rsp = httpx.get(base + "/", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert rsp.status_code == 200 and study(2) in rsp.text
    finally:
        server.should_exit = True
        thread.join(10)


def test_delivery_states_query(wl: Worklist) -> None:
    """The one delivery-state query the pages and ``triage worklist`` share."""
    sent = wl.deliveries.add(study(3), f"{ROOT}.9.3", "/outbox/sr.dcm", "PACS@h:1")
    wl.deliveries.add(study(3), f"{ROOT}.9.4", "/outbox/sc.dcm", "PACS@h:1")
    wl.deliveries.mark_sent(sent)
    states = wl.queries.delivery_states([study(2), study(3), study(4)])
    assert set(states) == {study(2), study(3)}  # none for a study without deliveries
    (pending,) = states[study(3)]
    assert pending["state"] == "pending" and pending["total"] == 2 and pending["sent"] == 1
    pacs, viewer = states[study(2)]  # sorted by destination
    assert (pacs["destination"], pacs["state"], pacs["sent"], pacs["failed"]) == (
        "PACS@127.0.0.1:104",
        "failed",
        1,
        1,
    )
    assert pacs["last_error"] == "association rejected" and pacs["total"] == 2
    assert (viewer["state"], viewer["pending"], viewer["total"]) == ("pending", 1, 1)
    assert wl.queries.delivery_states([]) == {}


def test_cli_table_shows_delivery_state(wl: Worklist) -> None:
    from dicom_node.commands.worklist import format_table

    rows = wl.queries.list_worklist(limit=100)
    table = format_table(rows, wl.queries.delivery_states([r["study_uid"] for r in rows]))
    line = next(x for x in table.splitlines() if study(2) in x)
    assert "PACS:1/2!" in line and "VIEWER:0/1~" in line
    assert table.splitlines()[-1].startswith("Legend: ")


def test_banner_suggests_dcmsend_and_full_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.commands.common import start_banner

    monkeypatch.setenv("PATH", str(tmp_path))  # neither triage nor dcmsend on PATH
    s = NodeSettings(storage=tmp_path / "st", ae_title="NODE_X", port=11999, http_port=8099)
    text = start_banner(s, "model")
    assert "/usr/bin/dcmsend -aec NODE_X 127.0.0.1 11999 " in text
    assert "http://127.0.0.1:8099/" in text
    shell = next(x for x in text.splitlines() if " worklist --storage " in x).strip()
    assert shell.startswith("/") and str((tmp_path / "st").resolve()) in shell


@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="openssl is not installed")
def test_http_api_component_over_tls_with_token(wl: Worklist, tmp_path: Path) -> None:
    """``HttpApi`` (as ``triage serve`` starts it) on HTTPS with a token: a client that trusts
    the CA reads the worklist with the token, is refused without it; plain HTTP fails."""
    from test_node_support import free_port
    from test_node_tls import _ca, _issue

    from dicom_node.metrics import Metrics
    from dicom_node.preflight import check_tls
    from dicom_node.web.server import HttpApi

    ca = _ca(tmp_path, "ca")
    key, cert = _issue(tmp_path, "server", ca, server=True)
    port = free_port()
    s = NodeSettings(
        storage=tmp_path,
        http_host="0.0.0.0",
        http_port=port,
        http_token=TOKEN,
        http_tls_cert=cert,
        http_tls_key=key,
    )
    check_tls(s)
    api = HttpApi(s, wl, Metrics(wl))
    api.start()
    try:
        base = f"https://127.0.0.1:{port}"
        trust = ssl.create_default_context(cafile=str(ca[1]))
        deadline = time.monotonic() + 60
        while True:
            try:
                rsp = httpx.get(base + "/api/worklist", verify=trust, timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "HTTPS server did not start"
                time.sleep(0.2)
        assert rsp.status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        ok = httpx.get(base + "/", headers=auth, verify=trust, timeout=10)
        assert ok.status_code == 200 and study(2) in ok.text
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/", headers=auth, timeout=5)
    finally:
        api.stop(time.monotonic() + 10)


def _reference(hot_bin: int, images: int = 600) -> dict[str, object]:
    from dicom_node.web.operations import FindingReference

    hist = [0.0] * 20
    hist[hot_bin] = 1.0
    return {"Effusion": FindingReference(tuple(hist), 0.3, images)}


def test_drift_reference_read_from_the_spec(tmp_path: Path) -> None:
    import json

    from dicom_node.web.operations import drift_reference

    hist = [0.05] * 20
    spec = {
        "drift": {
            "bins": 20,
            "images": 643,
            "classes": {"Effusion": {"histogram": hist, "positive_share": 0.25}},
        }
    }
    (tmp_path / "m.json").write_text(json.dumps(spec))
    ref = drift_reference(tmp_path / "m")
    assert ref["Effusion"].histogram == tuple(hist) and ref["Effusion"].images == 643
    assert ref["Effusion"].positive_share == 0.25
    (tmp_path / "old.json").write_text(json.dumps({"metrics": {}}))
    assert drift_reference(tmp_path / "old") == {}  # no reference: nothing is judged
    spec["drift"]["bins"] = 10  # type: ignore[index]
    (tmp_path / "ten.json").write_text(json.dumps(spec))
    assert drift_reference(tmp_path / "ten") == {}


def test_ks_distance_and_critical_value_by_hand() -> None:
    from dicom_node.web.operations import ks_critical, ks_distance

    ref = [0.5, 0.5] + [0.0] * 18
    assert ks_distance([2, 2] + [0] * 18, ref) == pytest.approx(0.0)
    assert ks_distance([0, 4] + [0] * 18, ref) == pytest.approx(0.5)  # cumulative 0 vs 0.5
    assert ks_distance([0] * 19 + [3], ref) == pytest.approx(1.0)
    assert ks_critical(40, 600) == pytest.approx(1.95 * (640 / 24000) ** 0.5)
    assert ks_critical(0, 600) == float("inf")


def test_operations_page_and_drift_metric(
    wl: Worklist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_node.metrics import Metrics
    from dicom_node.web import operations

    # three Effusion scores 0.2, 0.95, 0.6: far from a reference all in bin 0, but three studies
    # are too few for any distance to pass the critical value (> 1 for n = 3)
    data = operations.summary(wl, _reference(0))
    eff = data["findings"]["Effusion"]
    assert eff["n"] == 3 and eff["present"] == 2  # scores 0.2, 0.95, 0.6 against 0.5
    assert eff["share"] == pytest.approx(2 / 3) and eff["reference"] == 0.3
    assert eff["distance"] == pytest.approx(1.0) and eff["critical"] > 1.0
    assert eff["alarm"] is False
    assert data["last_day"] == 4 and data["queue_depth"] == 1
    assert data["delivery_counts"]["failed"] == 1 and data["failed"][0]["study_uid"] == study(2)
    assert data["inference_median"] == pytest.approx(0.25)
    many = Worklist(Worklist.sqlite_url(tmp_path / "many"))
    many.create_all()
    for n in range(10, 50):  # 40 studies, Effusion scores 0.905 ... 0.944 (all in bin 18)
        finish(many, n, 90.5 + (n - 10) / 10, "critical", NOW - 1000 + n)
    drifted = operations.summary(many, _reference(0))["findings"]["Effusion"]
    assert drifted["n"] == 40 and drifted["alarm"] is True
    assert drifted["distance"] == pytest.approx(1.0)
    assert drifted["critical"] == pytest.approx(1.95 * (640 / 24000) ** 0.5)
    same = operations.summary(many, _reference(18))["findings"]["Effusion"]
    assert same["distance"] == pytest.approx(0.0) and same["alarm"] is False
    s = NodeSettings(storage=tmp_path)
    metrics = Metrics(many)
    app = create_app(many, metrics)
    monkeypatch.setattr(operations, "drift_reference", lambda _model: _reference(0))
    web.install(app, s, many, metrics=metrics)
    c = TestClient(app)
    page = c.get("/operations")
    assert page.status_code == 200 and "failed deliveries" in page.text
    assert 'class="alarm"' in page.text and "Kolmogorov-Smirnov" in page.text
    text = c.get("/metrics").text
    assert 'triage_score_drift_alarm{finding="Effusion"} 1.0' in text
    assert 'triage_score_ks_distance{finding="Effusion"} 1.0' in text
    assert 'triage_finding_present_share{finding="Effusion"} 1.0' in text
    many.dispose()


def test_low_confidence_flag_is_shown(wl: Worklist, tmp_path: Path) -> None:
    from dicom_node.web.pages import templates

    row = wl.queries.list_worklist(limit=1)[0]
    assert "low_confidence" in row  # the worklist's rows carry it (revision 0003)
    row.update(low_confidence=True, waiting="1 min", waiting_class="fresh", deliveries=[])
    html = templates().get_template("worklist_rows.html").render(rows=[row])
    assert 'class="badge lowconf"' in html
    row["low_confidence"] = False
    html = templates().get_template("worklist_rows.html").render(rows=[row])
    assert "lowconf" not in html
