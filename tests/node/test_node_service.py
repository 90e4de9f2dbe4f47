"""Node components without the network: retention purge, worker pass on a claimed study,
wake-ups, and the outputs process never outliving its parent."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from test_node_support import synthetic_cr

from dicom_node.jobs import purge
from dicom_node.outputs import OutputsProcess
from dicom_node.processing import Processing
from dicom_node.service import open_worklist
from dicom_node.settings import load_settings
from dicom_node.wakeup import Wakeups
from triage_core.spec import StudyResult


def test_retention_purge_deletes_finished_studies_inside_storage(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    settings = load_settings(None, {"storage": storage, "retention_days": 1e-6, "workers": 0})
    worklist = open_worklist(settings)
    outside = synthetic_cr(tmp_path / "outside.dcm", size=32)
    uids = []
    for i in range(2):
        src = synthetic_cr(tmp_path / f"{i}.dcm", size=32, seed=i)
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        folder = storage / "spool" / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
        folder.mkdir(parents=True)
        path = src.rename(folder / f"{ds.SOPInstanceUID}.dcm")
        worklist.record_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path)
        uids.append(str(ds.StudyInstanceUID))
    # a third study whose row points outside the storage folder: never deleted
    ds = pydicom.dcmread(outside, stop_before_pixels=True)
    worklist.record_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), outside)
    worklist.queue_stable_studies(0.0)
    for _ in range(3):
        claimed = worklist.claim_study("w", 60)
        assert claimed is not None
        result = StudyResult(study_uid=claimed.study_uid, status="not_eligible", reason="test")
        assert worklist.complete_study(claimed.study_uid, "w", result) == "not_eligible"
    time.sleep(0.2)
    assert purge(settings, worklist) == 2
    assert outside.is_file()
    assert list((storage / "spool").iterdir()) == []  # emptied folders removed too
    assert (storage / "spool").is_dir()
    assert worklist.list_worklist() == []
    worklist.dispose()


def test_worker_pass_writes_sr_and_a_scaled_down_sc(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from triage_core.dicom_out import findings_from_sr
    from triage_core.inference import Predictor

    storage = tmp_path / "storage"
    settings = load_settings(
        None,
        {
            "storage": storage,
            "workers": 0,
            "sc_max_side": 96,
            "destinations": ["PACS@127.0.0.1:11112"],
        },
    )
    worklist = open_worklist(settings)
    study_uid = pydicom.uid.generate_uid()
    for i in range(2):
        path = synthetic_cr(tmp_path / f"{i}.dcm", study_uid=study_uid, size=256, seed=i)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        worklist.record_instance(study_uid, str(ds.SOPInstanceUID), path)
    worklist.queue_stable_studies(0.0)
    claimed = worklist.claim_study("w", 60)
    assert claimed is not None
    outputs = OutputsProcess()
    outputs.start()
    processing = Processing(
        settings,
        worklist,
        Wakeups(fallback=5.0),
        "test-node",
        predictor=Predictor(tiny_checkpoint, mode="eager"),
        outputs=outputs,
    )
    try:
        outcome = processing.process_claimed(claimed)
    finally:
        outputs.stop()
    assert outcome.status == "done"
    sr_path, sc_path = outcome.outputs
    assert sr_path.parent == storage / "outbox" / study_uid
    sr, sc = pydicom.dcmread(sr_path), pydicom.dcmread(sc_path)
    assert sr.Modality == "SR" and sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert max(sc.Rows, sc.Columns) == 96  # sc_max_side, from a 256 px source
    detail = worklist.study_detail(study_uid)
    assert detail is not None
    stored = {name: f["probability"] for name, f in detail["findings"].items()}
    assert {k: v[0] for k, v in findings_from_sr(sr).items()} == pytest.approx(stored)
    assert len(worklist.claim_due_deliveries(lease_seconds=60)) == 2  # SR and SC, one PACS
    worklist.dispose()


def test_a_notification_during_the_search_for_work_is_not_lost() -> None:
    import threading

    from dicom_node.wakeup import Signal

    signal = Signal()
    mark = signal.mark()  # a waiter looks for work ...
    signal.notify()  # ... while work arrives: its wait must return at once
    started = time.monotonic()
    assert signal.wait(mark, timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert not signal.wait(signal.mark(), timeout=0.05)  # nothing new: times out
    woken: list[bool] = []
    mark = signal.mark()
    waiters = [
        threading.Thread(target=lambda: woken.append(signal.wait(mark, 5.0))) for _ in range(3)
    ]
    for thread in waiters:
        thread.start()
    signal.notify()  # one notification wakes every waiter
    for thread in waiters:
        thread.join(5.0)
    assert woken == [True, True, True]


def test_wakeups_reject_an_unknown_topic_and_wake_from_a_source() -> None:
    from collections.abc import Callable

    from dicom_node.wakeup import DELIVERIES, Wakeups

    class Source:
        notify: Callable[[str], None]
        stopped = False

        def start(self, notify: Callable[[str], None]) -> None:
            self.notify = notify

        def stop(self) -> None:
            self.stopped = True

    wakeups = Wakeups(fallback=0.2)
    with pytest.raises(ValueError, match="unknown wake-up topic 'studys'"):
        wakeups.notify("studys")
    source = Source()
    wakeups.add_source(source, fallback=30.0)
    assert wakeups.fallback == 30.0
    mark = wakeups.deliveries.mark()
    source.notify(DELIVERIES)  # e.g. a NOTIFY from another process
    assert wakeups.deliveries.wait(mark, 1.0)
    wakeups.close()
    assert source.stopped


def test_one_lease_keeper_renews_every_held_study_and_drops_a_lost_one(tmp_path: Path) -> None:
    from dicom_node.processing import LeaseKeeper

    settings = load_settings(None, {"storage": tmp_path / "storage", "workers": 0})
    worklist = open_worklist(settings)
    for i in range(2):
        path = synthetic_cr(tmp_path / f"{i}.dcm", size=32, seed=i)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        worklist.record_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path)
    worklist.queue_stable_studies(0.0)
    first, second = worklist.claim_study("w1", 2.0), worklist.claim_study("w2", 2.0)
    assert first is not None and second is not None
    keeper = LeaseKeeper(worklist, lease_seconds=600.0)
    keeper.hold(first.study_uid, "w1")
    keeper.hold(second.study_uid, "someone-else")  # not the holder: renewal fails
    keeper.renew_all()
    expiries = {
        uid: worklist.study_detail(uid)["lease_expires_at"]  # type: ignore[index]
        for uid in (first.study_uid, second.study_uid)
    }
    assert expiries[first.study_uid] > expiries[second.study_uid]  # renewed to +600 s
    assert keeper.held() == {first.study_uid: "w1"}  # the lost lease is no longer renewed
    worklist.dispose()
