"""``triage worklist``: settings resolution, ordering, filters, table and JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicom_node.cli import main
from triage_core.spec import Finding, ImageResult, StudyResult
from triage_core.worklist import Worklist

ROOT = "1.2.826.0.1.3680043.8.498"
REPO = Path(__file__).resolve().parents[2]


def study(n: int) -> str:
    return f"{ROOT}.1.{n}"


def populate(url: str) -> None:
    wl = Worklist(url)
    wl.create_all()
    now = time.time()
    for n, score, level in ((1, 30.0, "routine"), (2, 88.0, "critical"), (3, 55.0, "urgent")):
        t = now - 1000 + n
        wl.ingest.record_instance(study(n), f"{ROOT}.2.{n}", f"/spool/{n}.dcm", now=t)
        wl.queue.queue_stable_studies(0, now=t)
        claimed = wl.queue.claim_study("w", 60, now=t)
        assert claimed is not None
        result = StudyResult(
            study_uid=study(n),
            status="done",
            findings=(
                Finding("Effusion", score / 100, 0.5, score >= 50, f"{ROOT}.2.{n}"),
                Finding("Atelectasis", 0.05, 0.5, False, f"{ROOT}.2.{n}"),
            ),
            priority_score=score,
            priority_level=level,
            images=(ImageResult(f"{ROOT}.2.{n}", True, "", {"Effusion": score / 100}),),
            model_name="random-test-model",
            model_version="0",
        )
        wl.queue.complete_study(study(n), "w", result, now=t + 1)
    wl.ingest.record_instance(study(4), f"{ROOT}.2.4", "/spool/4.dcm", now=now)  # receiving
    wl.dispose()


@pytest.fixture()
def storage(tmp_path: Path) -> Path:
    folder = tmp_path / "node-storage"
    populate(Worklist.sqlite_url(folder))
    return folder


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["worklist", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def usage_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """An argument refused by its argparse type: argparse's exit 2 and its message."""
    with pytest.raises(SystemExit) as exc:
        main(["worklist", *args])
    code = exc.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


def test_json_rows_in_priority_order(storage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--storage", str(storage), "--format", "json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [r["study_uid"] for r in rows] == [study(2), study(3), study(1), study(4)]
    for key in ("study_uid", "status", "reason", "priority_score", "priority_level", "findings"):
        assert key in rows[0]
    assert rows[0]["findings"]["Effusion"] == {"probability": 0.88, "present": True}
    assert rows[0]["effective_priority"] >= 88.0  # default aging never lowers the score
    assert rows[-1]["status"] == "receiving" and rows[-1]["priority_score"] is None


def test_filters_and_limit(storage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--storage", str(storage), "--format", "json"]
    code, out, _ = run_cli([*base, "--status", "receiving"], capsys)
    assert code == 0 and [r["study_uid"] for r in json.loads(out)] == [study(4)]
    code, out, _ = run_cli([*base, "--status", "done", "--limit", "2", "--no-aging"], capsys)
    rows = json.loads(out)
    assert [r["study_uid"] for r in rows] == [study(2), study(3)]
    assert rows[0]["effective_priority"] == 88.0
    code, out, _ = run_cli([*base, "--min-priority", "urgent"], capsys)
    assert [r["study_uid"] for r in json.loads(out)] == [study(2), study(3)]
    code, out, _ = run_cli([*base, "--min-priority", "80", "--no-aging"], capsys)
    assert [r["study_uid"] for r in json.loads(out)] == [study(2)]


def test_table_output(storage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--storage", str(storage)], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["PRIO", "SCORE", "LEVEL", "STATUS"]
    assert [line.split()[-1] for line in lines[1:5]] == [study(n) for n in (2, 3, 1, 4)]
    assert lines[0].split()[4] == "DELIVERY" and lines[-1].startswith("Legend: ")
    assert "'+' at or above its threshold" in lines[-1] and "'!' failed" in lines[-1]
    assert "critical" in lines[1] and "Effusion 0.88+" in lines[1]
    assert "receiving" in lines[4]
    code, out, _ = run_cli(["--storage", str(storage), "--status", "failed"], capsys)
    assert code == 0 and out.strip() == "(no studies)"


def test_study_detail(storage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--storage", str(storage), "--study", study(3)], capsys)
    assert code == 0
    detail = json.loads(out)
    assert detail["study_uid"] == study(3) and detail["priority_level"] == "urgent"
    assert detail["findings"]["Effusion"]["threshold"] == 0.5
    assert detail["images"][0]["eligible"] is True
    code, _, err = run_cli(["--storage", str(storage), "--study", f"{ROOT}.1.99"], capsys)
    assert code == 1 and "not found" in err
    code, err = usage_error(["--storage", str(storage), "--study", "1.02"], capsys)
    assert code == 2 and "argument --study: '1.02' is not a valid DICOM UID" in err


def test_config_file_and_db_flag(
    storage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[triage]\nstorage = "{storage}"\n')
    code, out, _ = run_cli(["--config", str(config), "--format", "json"], capsys)
    assert code == 0 and len(json.loads(out)) == 4
    top_level = tmp_path / "flat.toml"
    top_level.write_text(f'db = "{Worklist.sqlite_url(storage)}"\n')
    code, out, _ = run_cli(["--config", str(top_level), "--format", "json"], capsys)
    assert code == 0 and len(json.loads(out)) == 4
    # the flag wins over the file
    empty = tmp_path / "empty-storage"
    populate_empty = Worklist(Worklist.sqlite_url(empty))
    populate_empty.create_all()
    populate_empty.dispose()
    code, out, _ = run_cli(
        ["--config", str(config), "--storage", str(empty), "--format", "json"], capsys
    )
    assert code == 0 and json.loads(out) == []
    code, out, _ = run_cli(["--db", Worklist.sqlite_url(storage), "--format", "json"], capsys)
    assert code == 0 and len(json.loads(out)) == 4


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing-here"
    code, out, err = run_cli(["--storage", str(missing)], capsys)
    assert code == 1 and out == "" and "no worklist at" in err
    assert not missing.exists()  # a read-only command creates nothing
    missing_db = tmp_path / "elsewhere" / "wl.sqlite3"
    code, _, err = run_cli(["--db", f"sqlite:///{missing_db}"], capsys)
    assert code == 1 and "no worklist at" in err and not missing_db.parent.exists()
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("storage = [unclosed")
    code, _, err = run_cli(["--config", str(bad_toml)], capsys)
    assert code == 2 and "not valid TOML" in err
    code, _, err = run_cli(["--db", "not-a-url"], capsys)
    assert code == 2 and "db" in err
    code, err = usage_error(["--storage", str(tmp_path), "--min-priority", "high"], capsys)
    assert code == 2 and "--min-priority" in err
    code, err = usage_error(["--storage", str(tmp_path), "--limit", "0"], capsys)
    assert code == 2 and "--limit" in err
    empty_db = tmp_path / "no-tables.sqlite3"
    empty_db.touch()
    code, _, err = run_cli(["--db", f"sqlite+pysqlite:///{empty_db}"], capsys)
    assert code == 1 and "no such table" in err


def test_console_entry_point(storage: Path) -> None:
    env = {**os.environ, "TRIAGE_STORAGE": str(storage)}
    proc = subprocess.run(
        [sys.executable, "-m", "dicom_node", "worklist", "--format", "json", "--limit", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["study_uid"] for r in json.loads(proc.stdout)] == [study(2)]


@pytest.mark.postgres
def test_postgres_db_flag(postgres_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    populate(postgres_database)
    code, out, _ = run_cli(["--db", postgres_database, "--format", "json"], capsys)
    assert code == 0
    assert [r["study_uid"] for r in json.loads(out)] == [study(n) for n in (2, 3, 1, 4)]
