"""Readers' verdicts over HTTP and named tokens with roles (TestClient over a real SQLite worklist;
the browser test is test_web_feedback.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api_http import NOW, finish, study

from dicom_node import web
from dicom_node.settings import NodeSettings
from dicom_node.web import access
from dicom_node.web.api import create_app
from triage_core.errors import WorklistError
from triage_core.worklist import Worklist
from triage_core.worklist.feedback import MAX_NOTE, combine

SHARED = "shared-admin-token-0123456789"
NOTE = "Pt. Zaphod Beeblebrox-Quux says ouch"  # must never reach a log line


@pytest.fixture()
def wl(tmp_path: Path) -> Iterator[Worklist]:
    w = Worklist(Worklist.sqlite_url(tmp_path))
    w.create_all()
    finish(w, 1, 80.0, "urgent", NOW - 600)  # Effusion 0.80 (present), Infiltration 0.20
    finish(w, 2, 0.0, "routine", NOW - 300, status="not_eligible")
    yield w
    w.dispose()


def client(wl: Worklist, tmp_path: Path, **settings: object) -> TestClient:
    s = NodeSettings(storage=tmp_path, **settings)  # type: ignore[arg-type]
    app = create_app(wl)
    web.install(app, s, wl)
    return TestClient(app)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_store_hashes_only_and_revoke(wl: Worklist) -> None:
    token = wl.tokens.add("dr.reed", "reader", now=NOW)
    assert len(token) >= 40 and wl.tokens.lookup(token) == ("dr.reed", "reader")
    with wl.engine.connect() as conn:
        dump = "\n".join(str(tuple(r)) for r in conn.exec_driver_sql("SELECT * FROM api_tokens"))
    assert token not in dump and "dr.reed" in dump  # the hash is stored, not the token
    with pytest.raises(WorklistError, match="already has a token"):
        wl.tokens.add("dr.reed", "viewer")
    with pytest.raises(WorklistError, match="role"):
        wl.tokens.add("x", "superuser")
    with pytest.raises(WorklistError, match="user name"):
        wl.tokens.add("bad name", "viewer")
    assert wl.tokens.revoke("dr.reed") and not wl.tokens.revoke("dr.reed")
    assert wl.tokens.lookup(token) is None
    again = wl.tokens.add("dr.reed", "viewer")  # a revoked name gets a new token
    assert again != token and wl.tokens.lookup(again) == ("dr.reed", "viewer")
    assert [(t.name, t.role, t.active) for t in wl.tokens.list()] == [("dr.reed", "viewer", True)]
    assert wl.tokens.lookup("x" * 10_000) is None


def test_final_verdict_combines_each_readers_latest() -> None:
    assert combine(["present"]) == "present"
    assert combine(["present", "unsure"]) == "present"
    assert combine(["present", "absent"]) == "disputed"
    assert combine(["unsure"]) == "unsure" and combine([]) == "unsure"


def test_reader_posts_viewer_cannot(
    wl: Worklist, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader = wl.tokens.add("dr.reed", "reader")
    viewer = wl.tokens.add("vic", "viewer")
    c = client(wl, tmp_path)
    url = f"/api/studies/{study(1)}/feedback"
    assert c.get(url).status_code == 401  # named tokens exist: every request needs one
    caplog.set_level(logging.DEBUG)
    rsp = c.post(
        url,
        json={"finding": "Effusion", "verdict": "present", "note": NOTE},
        headers=bearer(reader),
    )
    assert rsp.status_code == 201, rsp.text
    saved = rsp.json()
    assert saved["user"] == "dr.reed" and saved["verdict"] == "present"
    assert saved["model"] == "" or isinstance(saved["model"], str)
    assert saved["probability"] == pytest.approx(0.8)
    assert (
        c.post(
            url, json={"finding": "Infiltration", "verdict": "absent"}, headers=bearer(reader)
        ).status_code
        == 201
    )
    # a changed mind is a new row; the latest counts
    assert (
        c.post(
            url, json={"finding": "Infiltration", "verdict": "unsure"}, headers=bearer(reader)
        ).status_code
        == 201
    )
    assert (
        c.post(
            url, json={"finding": "Infiltration", "verdict": "absent"}, headers=bearer(reader)
        ).status_code
        == 201
    )
    # another ChestX-ray14 finding ("other finding")
    assert (
        c.post(
            url, json={"finding": "Pneumothorax", "verdict": "present"}, headers=bearer(reader)
        ).status_code
        == 201
    )
    denied = c.post(url, json={"finding": "Effusion", "verdict": "absent"}, headers=bearer(viewer))
    assert denied.status_code == 403 and "reader" in denied.json()["detail"]
    got = c.get(url, headers=bearer(viewer))
    assert got.status_code == 200
    body = got.json()
    assert body["count"] == 5
    first = body["verdicts"][0]
    assert {k: first[k] for k in ("finding", "verdict", "user")} == {
        "finding": "Effusion",
        "verdict": "present",
        "user": "dr.reed",
    }
    assert {"at", "model", "model_version"} <= set(first)
    assert body["final"]["Infiltration"]["verdict"] == "absent"
    assert body["final"]["Pneumothorax"]["verdict"] == "present"
    # the shared http_token keeps working, as the admin
    c2 = client(wl, tmp_path, http_token=SHARED)
    assert (
        c2.post(
            url, json={"finding": "Effusion", "verdict": "present"}, headers=bearer(SHARED)
        ).json()["user"]
        == "admin"
    )
    assert c2.get(url, headers=bearer(reader)).status_code == 200  # named tokens too
    assert NOTE not in caplog.text and "Beeblebrox" not in caplog.text


def test_bad_feedback_gets_a_clear_4xx(wl: Worklist, tmp_path: Path) -> None:
    reader = wl.tokens.add("dr.reed", "reader")
    c = client(wl, tmp_path)
    h = bearer(reader)
    url = f"/api/studies/{study(1)}/feedback"

    def detail(rsp: object, status: int) -> str:
        assert rsp.status_code == status, rsp.text  # type: ignore[attr-defined]
        return str(rsp.json()["detail"])  # type: ignore[attr-defined]

    assert "verdict" in detail(
        c.post(url, json={"finding": "Effusion", "verdict": "maybe"}, headers=h), 422
    )
    assert "finding" in detail(
        c.post(url, json={"finding": "Broken leg", "verdict": "present"}, headers=h), 422
    )
    assert "note" in detail(
        c.post(
            url,
            json={"finding": "Effusion", "verdict": "present", "note": "x" * (MAX_NOTE + 1)},
            headers=h,
        ),
        422,
    )
    assert "JSON" in detail(c.post(url, content=b"{not json", headers=h), 422)
    assert detail(c.post(url, content=b"x" * 100_000, headers=h), 413)
    assert detail(
        c.post(url, json={"finding": "Effusion", "verdict": "present", "extra": 1}, headers=h), 422
    )
    missing = f"/api/studies/{study(99)}/feedback"
    assert detail(
        c.post(missing, json={"finding": "Effusion", "verdict": "present"}, headers=h), 404
    )
    assert detail(c.get(missing, headers=h), 404)
    assert "not_eligible" in detail(
        c.post(
            f"/api/studies/{study(2)}/feedback",
            json={"finding": "Effusion", "verdict": "present"},
            headers=h,
        ),
        409,
    )
    assert detail(c.post("/api/studies/1..2/feedback", json={}, headers=h), 422)
    assert wl.feedback.for_study(study(1)) == []  # nothing stored by any of these


def test_anonymous_loopback_reads_but_cannot_judge(wl: Worklist, tmp_path: Path) -> None:
    c = client(wl, tmp_path)  # no token of any kind: loopback, anonymous viewer
    url = f"/api/studies/{study(1)}/feedback"
    assert c.get(url).status_code == 200
    assert c.post(url, json={"finding": "Effusion", "verdict": "present"}).status_code == 403
    page = c.get(f"/studies/{study(1)}")
    assert page.status_code == 200 and 'id="fb-readonly"' in page.text
    assert 'class="vd' not in page.text


def test_study_page_shows_controls_to_readers_only(wl: Worklist, tmp_path: Path) -> None:
    reader = wl.tokens.add("dr.reed", "reader")
    viewer = wl.tokens.add("vic", "viewer")
    wl.feedback.add(study(1), "Effusion", "present", "dr.reed", note="<b>bold</b>")
    c = client(wl, tmp_path)
    page = c.get(f"/studies/{study(1)}", headers=bearer(reader)).text
    assert 'data-verdict="absent"' in page and 'class="vd on" data-finding="Effusion"' in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold</b>" not in page  # escaped
    login = c.get(f"/studies/{study(1)}?token={viewer}", follow_redirects=False)
    assert login.status_code == 303  # a named token logs in like the shared one
    c.cookies.set(access.COOKIE, viewer)
    page = c.get(f"/studies/{study(1)}").text
    assert 'id="fb-readonly"' in page and "data-verdict" not in page
    assert "dr.reed: present" in page  # viewers still see the verdicts
    wl.tokens.revoke("vic")
    access_guard_cache_seconds = access.CACHE_SECONDS
    assert access_guard_cache_seconds <= 5.0  # revocation takes effect within seconds
