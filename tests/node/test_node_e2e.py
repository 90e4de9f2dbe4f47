"""``triage serve`` as a real subprocess, fed by DCMTK storescu, delivering to DCMTK storescp.

The model is the random-weight ``tiny_checkpoint`` (plumbing only: the probabilities mean
nothing clinically; the tests compare the SR with the worklist, never with a diagnosis).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
import pytest
from test_node_support import (
    DCIODVFY,
    ServeProcess,
    free_port,
    needs_dcmtk,
    storescp_destination,
    storescu,
    synthetic_cr,
)

pytestmark = needs_dcmtk

#: RG1 chest in three transfer syntaxes, the SIIM chest as JPEG baseline, its RLE derivative.
CHEST_FILES = (
    "RG1_UNCR.dcm",
    "RG1_J2KR.dcm",
    "RG1_J2KI.dcm",
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "siim_cr_chest_rle_derived.dcm",
)
HIP_FILES = ("RG2_JPLL.dcm", "RG2_JLSL.dcm", "RG2_JPLY_fixed.dcm")


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, log: Callable[[], str]
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{log()[-6000:]}")


def http_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
        return json.load(rsp)


class Node:
    """A started ``triage serve`` with its ports and folders."""

    def __init__(self, tmp: Path, model: Path, dest_port: int, extra: list[str] | None = None):
        self.port = free_port()
        self.http_port = free_port()
        self.storage = tmp / "storage"
        self.args = [
            "serve",
            "--port", str(self.port),
            "--bind-address", "127.0.0.1",
            "--storage", str(self.storage),
            "--model", str(model),
            "--stable-age", "1",
            "--http-port", str(self.http_port),
            "--destination", f"PACS@127.0.0.1:{dest_port}",
            "--threads", "1",
            *(extra or []),
        ]  # fmt: skip
        self.log_path = tmp / "serve.log"
        self.env = {"TRIAGE_DELIVERY_BACKOFF": "1", "TRIAGE_DELIVERY_BACKOFF_MAX": "2"}
        self.proc = ServeProcess(self.args, self.log_path, self.env)

    def start(self) -> Node:
        self.proc = ServeProcess(self.args, self.log_path, self.env).start()
        self.proc.wait_ready(self.port)
        return self

    def studies(self) -> dict[str, dict[str, Any]]:
        return {
            r["study_uid"]: r
            for r in http_json(self.http_port, "/api/worklist?limit=1000")["items"]
        }

    def study(self, uid: str) -> dict[str, Any]:
        return dict(http_json(self.http_port, f"/api/studies/{uid}"))

    def finished(self, uid: str) -> dict[str, Any] | None:
        row = self.studies().get(uid)
        return row if row and row["status"] in ("done", "not_eligible", "failed") else None


@pytest.fixture
def dest_port() -> int:
    return free_port()


@pytest.fixture
def node(tmp_path: Path, tiny_checkpoint: Path, dest_port: int) -> Iterator[Node]:
    n = Node(tmp_path, tiny_checkpoint, dest_port)
    try:
        yield n
    finally:
        n.proc.stop()


def _received(out_dir: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(out_dir.glob("*")) if p.is_file()]


def _dciodvfy_errors(path: Path) -> str:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
    return "" if proc.returncode == 0 and not errors else "\n".join(errors) or proc.stderr


def test_chest_studies_in_every_syntax_get_sr_sc_and_pm(
    node: Node, dicom_dir: Path, dest_port: int, tmp_path: Path
) -> None:
    import highdicom

    from triage_core.dicom_out import findings_from_sr, priority_from_sr

    out = tmp_path / "pacs"
    with storescp_destination(out, dest_port):
        node.start()
        files = [dicom_dir / name for name in CHEST_FILES]
        for path in files:
            proc = storescu(node.port, [path])
            assert proc.returncode == 0, proc.stderr
        studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files}
        assert len(studies) == 2  # RG1 x3 share one study; the SIIM files share another
        for uid in studies:
            row = wait_for(partial(node.finished, uid), 120, f"study {uid}", node.proc.log)
            assert row["status"] == "done", row
        # 3 objects (SR + SC + PM) per study
        wait_for(lambda: len(list(out.glob("*"))) >= 6, 60, "6 objects at storescp", node.proc.log)
        time.sleep(0.5)  # storescp renames a file once it is complete
        received = _received(out)
    assert len(received) == 6
    by_study: dict[str, list[pydicom.Dataset]] = {}
    for ds in received:
        by_study.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    assert set(by_study) == studies
    for study_uid, objects in by_study.items():
        srs = [ds for ds in objects if ds.Modality == "SR"]
        scs = [ds for ds in objects if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"]
        pms = [ds for ds in objects if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"]
        assert len(srs) == 1 and len(scs) == 1 and len(pms) == 1
        sr, sc, pm = srs[0], scs[0], pms[0]
        source_series = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID) for p in files
        }
        assert str(sc.SeriesInstanceUID) not in source_series
        assert sc.SeriesInstanceUID != sr.SeriesInstanceUID
        assert str(pm.SeriesInstanceUID) not in source_series | {sc.SeriesInstanceUID}
        assert (pm.Rows, pm.Columns) == (sc.Rows, sc.Columns)  # the map behind the overlay
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert sc.PhotometricInterpretation == "RGB"
        # highdicom reads both back
        highdicom.sr.Comprehensive3DSR.from_dataset(sr)
        image = highdicom.Image.from_dataset(sc)
        assert image.get_frame(1).shape == (int(sc.Rows), int(sc.Columns), 3)
        parametric = highdicom.pm.ParametricMap.from_dataset(pm)
        assert parametric.get_frame(1).shape == (int(pm.Rows), int(pm.Columns))
        # the SR's findings and priority equal the worklist's
        detail = node.study(study_uid)
        sr_findings = findings_from_sr(sr)
        assert set(sr_findings) == set(detail["findings"])
        for name, (probability, present) in sr_findings.items():
            assert probability == pytest.approx(detail["findings"][name]["probability"], abs=1e-4)
            assert present == detail["findings"][name]["present"]
        score, level = priority_from_sr(sr)
        assert score == pytest.approx(detail["priority_score"], abs=0.05)
        assert level == detail["priority_level"]
        assert all(d["status"] == "sent" for d in detail["deliveries"])
    for path in sorted(out.glob("*")):
        assert _dciodvfy_errors(path) == "", path.name


def test_hip_and_lateral_are_not_eligible_and_nothing_is_sent(
    node: Node, dicom_dir: Path, dest_port: int, tmp_path: Path
) -> None:
    out = tmp_path / "pacs"
    lateral = synthetic_cr(tmp_path / "lateral.dcm", view="LL", seed=3)
    with storescp_destination(out, dest_port):
        node.start()
        for path in [dicom_dir / HIP_FILES[0], lateral]:
            assert storescu(node.port, [path]).returncode == 0
        hip_uid = str(pydicom.dcmread(dicom_dir / HIP_FILES[0]).StudyInstanceUID)
        lat_uid = str(pydicom.dcmread(lateral).StudyInstanceUID)
        hip = wait_for(lambda: node.finished(hip_uid), 60, "hip study", node.proc.log)
        lat = wait_for(lambda: node.finished(lat_uid), 60, "lateral study", node.proc.log)
        time.sleep(2)  # a delivery pass would have run by now
    assert hip["status"] == "not_eligible" and "HIP" in hip["reason"].upper()
    assert lat["status"] == "not_eligible" and "lateral" in lat["reason"].lower()
    assert list(out.glob("*")) == []
    assert node.study(hip_uid)["deliveries"] == []


def test_destination_down_then_up_receives_everything(
    node: Node, dest_port: int, tmp_path: Path
) -> None:
    node.start()
    path = synthetic_cr(tmp_path / "chest.dcm", size=96, seed=5)
    study_uid = str(pydicom.dcmread(path).StudyInstanceUID)
    assert storescu(node.port, [path]).returncode == 0
    wait_for(lambda: node.finished(study_uid), 60, "study done", node.proc.log)

    def failed_attempts() -> bool:
        deliveries = node.study(study_uid)["deliveries"]
        return bool(deliveries) and all(
            d["status"] == "pending" and d["attempts"] >= 1 for d in deliveries
        )

    wait_for(failed_attempts, 30, "failed delivery attempts", node.proc.log)
    out = tmp_path / "pacs"
    with storescp_destination(out, dest_port):
        received = wait_for(
            lambda: len(list(out.glob("*"))) >= 3 and list(out.glob("*")),
            60,
            "retried deliveries",
            node.proc.log,
        )
        # recorded once the association is released (the destination must still be up)
        deliveries = wait_for(
            lambda: (
                all(d["status"] == "sent" for d in node.study(study_uid)["deliveries"])
                and node.study(study_uid)["deliveries"]
            ),
            30,
            "deliveries recorded as sent",
            node.proc.log,
        )
    assert len(received) == 3  # SR, SC, PM
    assert len(deliveries) == 3 and all(d["status"] == "sent" for d in deliveries), deliveries


def test_kill9_during_processing_then_restart_completes(
    tmp_path: Path, tiny_checkpoint: Path, dest_port: int
) -> None:
    import sqlite3

    node = Node(tmp_path, tiny_checkpoint, dest_port, ["--lease-seconds", "3"])
    study_uid = "1.2.826.0.1.3680043.8.498.777"
    # a study big enough (8 images of 1536 px) that processing takes a moment to kill into
    sent = [
        synthetic_cr(tmp_path / f"s{i}.dcm", size=1536, seed=10 + i, study_uid=study_uid)
        for i in range(8)
    ]
    try:
        node.start()
        assert storescu(node.port, sent).returncode == 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if node.studies().get(study_uid, {}).get("status") == "processing":
                break
            time.sleep(0.05)
        else:
            raise AssertionError("study never seen processing\n" + node.proc.log()[-4000:])
        node.proc.kill9()
        # every instance that got success is on disk and in the database
        with sqlite3.connect(node.storage / "worklist.sqlite3") as conn:
            rows = dict(conn.execute("SELECT sop_uid, path FROM instances").fetchall())
            status = conn.execute(
                "SELECT status FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()[0]
        assert status == "processing"  # killed mid-way
        for path in sent:
            sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert sop in rows and Path(rows[sop]).is_file()
        # restart: the expired lease is recovered and the study completes
        node.start()
        row = wait_for(lambda: node.finished(study_uid), 120, "study after restart", node.proc.log)
        assert row["status"] == "done", row
        assert row["num_instances"] == len(sent)
        assert node.study(study_uid)["attempts"] >= 2
    finally:
        node.proc.stop()


# ---------------------------------------------------------------------- no orphans after kill -9
def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, parent pid, start time)`` of a process from ``/proc``; ``None`` if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid -> start time (to tell a reused pid apart)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    found: dict[int, int] = {}
    parents = {root}
    while parents:
        children = {
            pid for pid, (state, ppid, _) in stats.items() if ppid in parents and state != "Z"
        }
        children -= set(found)
        found.update({pid: stats[pid][2] for pid in children})
        parents = children
    return found


def _still_running(pid: int, started: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[2] == started and stat[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(gone)"


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_kill9_leaves_no_child_process_running(
    command: str, tmp_path: Path, tiny_checkpoint: Path, dest_port: int
) -> None:
    """SIGKILL of ``triage serve`` / ``triage worker`` takes its children with it: the spawned
    outputs process (after it built a study's SR and SC) and multiprocessing's resource
    tracker. An idle ``serve`` has no child: the first study spawns the outputs process."""
    node = Node(tmp_path, tiny_checkpoint, dest_port)
    children: dict[int, int] = {}
    try:
        if command == "serve":
            node.start()
            assert node.proc.proc is not None
            idle = [_cmdline(pid) for pid in _descendants(node.proc.proc.pid)]
            assert idle == [], idle  # the outputs process starts with the first study
            path = synthetic_cr(tmp_path / "chest.dcm", size=96, seed=7)
            study_uid = str(pydicom.dcmread(path).StudyInstanceUID)
            assert storescu(node.port, [path]).returncode == 0
            row = wait_for(lambda: node.finished(study_uid), 60, "study", node.proc.log)
            assert row["status"] == "done", row
            assert "stage=outputs 3 object(s)" in node.proc.log()  # the child did work
        else:
            node.proc = ServeProcess(
                ["worker", "--storage", str(node.storage), "--model", str(tiny_checkpoint),
                 "--threads", "1"],
                node.log_path,
            ).start()  # fmt: skip
            wait_for(lambda: " started:" in node.proc.log(), 120, "worker start", node.proc.log)
        assert node.proc.proc is not None
        server = node.proc.proc.pid
        children = _descendants(server)
        outputs = re.findall(r"outputs process (\d+) ready", node.proc.log())
        assert outputs and int(outputs[-1]) in children, (children, node.proc.log()[-3000:])
        cmdlines = {pid: _cmdline(pid) for pid in children}
        assert any("resource_tracker" in c for c in cmdlines.values()), cmdlines
        node.proc.proc.send_signal(signal.SIGKILL)
        node.proc.proc.wait(10)
        deadline = time.monotonic() + 5.0
        alive = dict(children)
        while alive and time.monotonic() < deadline:
            alive = {pid: t for pid, t in alive.items() if _still_running(pid, t)}
            time.sleep(0.1)
        assert not alive, {pid: cmdlines[pid] for pid in alive}
    finally:
        node.proc.stop()
        for pid, started in children.items():  # never leave what this test found behind
            if _still_running(pid, started):
                os.kill(pid, signal.SIGKILL)
