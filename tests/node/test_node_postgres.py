"""Two ``triage worker`` processes on one real PostgreSQL: every study processed exactly once."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pydicom
import pytest
from test_node_support import ServeProcess, synthetic_cr

from dicom_node.node import open_worklist
from dicom_node.settings import load_settings

pytestmark = pytest.mark.postgres

N_STUDIES = 20


def test_two_worker_processes_process_each_study_once(
    postgres_database: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    settings = load_settings(None, {"db": postgres_database, "storage": storage})
    worklist = open_worklist(settings)
    (storage / "spool").mkdir(parents=True)
    studies: list[str] = []
    for i in range(N_STUDIES):
        path = synthetic_cr(storage / "spool" / f"{i}.dcm", size=64, seed=i)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies.append(str(ds.StudyInstanceUID))
        assert worklist.ingest.record_instance(
            str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path,
            series_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID),
        )  # fmt: skip
    workers = [
        ServeProcess(
            [
                "worker",
                "--db",
                postgres_database,
                "--storage",
                str(storage),
                "--model",
                str(tiny_checkpoint),
                "--workers",
                "1",
                "--threads",
                "1",
            ],
            tmp_path / f"worker{k}.log",
        ).start()  # fmt: skip
        for k in range(2)
    ]
    try:
        deadline = time.monotonic() + 180
        while not all("worker" in w.log() and " started:" in w.log() for w in workers):
            assert time.monotonic() < deadline, "workers did not start:\n" + "".join(
                w.log()[-3000:] for w in workers
            )
            for w in workers:
                assert w.proc is not None and w.proc.poll() is None, w.log()
            time.sleep(0.2)
        assert sorted(worklist.queue.queue_stable_studies(0.0)) == sorted(studies)
        deadline = time.monotonic() + 180
        while (
            worklist.queries.counts_by_status()["done"]
            + worklist.queries.counts_by_status()["not_eligible"]
            < N_STUDIES
        ):
            assert time.monotonic() < deadline, worklist.queries.counts_by_status()
            time.sleep(0.5)
    finally:
        codes = [w.stop() for w in workers]
    assert codes == [0, 0]
    counts = worklist.queries.counts_by_status()
    assert counts["done"] == N_STUDIES, counts
    for uid in studies:
        detail = worklist.queries.study_detail(uid)
        assert detail is not None and detail["attempts"] == 1, detail
    # each study logged as processed by exactly one process, and both processes worked
    per_worker = [re.findall(r"study (\S+) stage=processing", w.log()) for w in workers]
    merged = per_worker[0] + per_worker[1]
    assert sorted(merged) == sorted(studies)
    assert all(per_worker), [len(p) for p in per_worker]
    # idle workers were woken by the database's notifications (LISTEN/NOTIFY), not a 0.2 s poll
    assert all("wake-ups: listening for the database's notifications" in w.log() for w in workers)
    worklist.dispose()
