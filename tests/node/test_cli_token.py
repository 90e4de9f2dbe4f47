"""``triage token add/list/revoke`` against the worklist ``triage serve`` uses (same flags)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.cli import main
from triage_core.worklist import Worklist


def test_token_add_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "storage"
    assert main(["token", "add", "dr.reed", "--role", "reader", "--storage", str(storage)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert len(token) >= 40 and "cannot be shown again" in out.err
    wl = Worklist(Worklist.sqlite_url(storage))
    try:
        assert wl.tokens.lookup(token) == ("dr.reed", "reader")
    finally:
        wl.dispose()
    assert main(["token", "list", "--storage", str(storage), "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["role"], t["revoked_at"]) for t in listed] == [
        ("dr.reed", "reader", None)
    ]
    assert token not in json.dumps(listed)
    assert main(["token", "add", "dr.reed", "--role", "admin", "--storage", str(storage)]) == 1
    assert "already has a token" in capsys.readouterr().err
    assert main(["token", "revoke", "dr.reed", "--storage", str(storage)]) == 0
    assert main(["token", "revoke", "dr.reed", "--storage", str(storage)]) == 1
    assert main(["token", "list", "--storage", str(storage)]) == 0
    table = capsys.readouterr().out
    assert "dr.reed" in table and "reader" in table and token not in table


def test_token_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none"
    assert main(["token", "list", "--storage", str(missing)]) == 1
    assert "no worklist" in capsys.readouterr().err and not missing.exists()
    assert main(["token", "add", "bad name", "--role", "reader", "--storage", str(tmp_path)]) == 1
    assert "user name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["token", "add", "x", "--role", "root", "--storage", str(tmp_path)])
    assert main(["token", "list", "--db", "mysql://x/y"]) == 1
    assert "unsupported database" in capsys.readouterr().err


def test_feedback_list_and_export_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_api_http import NOW, finish, study

    storage = tmp_path / "storage"
    wl = Worklist(Worklist.sqlite_url(storage))
    try:
        wl.create_all()
        finish(wl, 1, 80.0, "urgent", NOW - 60)  # spooled file /spool/1.dcm does not exist
        wl.feedback.add(study(1), "Effusion", "present", "dr.reed", note="private words")
        wl.feedback.add(study(1), "Infiltration", "absent", "dr.reed")
    finally:
        wl.dispose()
    assert main(["feedback", "list", "--storage", str(storage), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["study_uid"], r["finding"], r["verdict"], r["user"]) for r in rows] == [
        (study(1), "Effusion", "present", "dr.reed"),
        (study(1), "Infiltration", "absent", "dr.reed"),
    ]
    assert main(["feedback", "list", "--storage", str(storage)]) == 0
    table = capsys.readouterr().out
    assert "Effusion" in table and "private words" not in table  # notes only in JSON
    with pytest.raises(SystemExit) as exc:
        main(["feedback", "list", "--storage", str(storage), "--study", "1..2"])
    assert exc.value.code == 2
    assert "argument --study: '1..2' is not a valid DICOM UID" in capsys.readouterr().err
    out = tmp_path / "export"
    assert main(["feedback", "export", "--storage", str(storage), "--out", str(out)]) == 0
    assert "wrote 0 images of 0 studies (0 patients, 1 images skipped)" in capsys.readouterr().out
    assert (out / "labels.csv").read_text().count("\n") == 1  # the header only
    assert main(["feedback", "export", "--storage", str(storage), "--out", str(out)]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    bad = ["feedback", "export", "--storage", str(storage), "--out", str(tmp_path / "e2")]
    assert main([*bad, "--image-size", "8"]) == 1
    assert "--image-size" in capsys.readouterr().err
    assert main(["feedback", "export", "--storage", str(tmp_path / "no"), "--out", str(out)]) == 1
