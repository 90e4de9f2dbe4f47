"""Node components without the network: retention purge, worker pass on a claimed study,
wake-ups, and the outputs process never outliving its parent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from test_node_support import synthetic_cr

from dicom_node.node import open_worklist
from dicom_node.settings import load_settings
from dicom_node.stages.jobs import purge
from dicom_node.stages.outputs import OutputsProcess
from dicom_node.stages.process import Processing
from dicom_node.stages.wakeup import Wakeups
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
        worklist.ingest.record_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path)
        uids.append(str(ds.StudyInstanceUID))
    # a third study whose row points outside the storage folder: never deleted
    ds = pydicom.dcmread(outside, stop_before_pixels=True)
    worklist.ingest.record_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), outside)
    worklist.queue.queue_stable_studies(0.0)
    for _ in range(3):
        claimed = worklist.queue.claim_study("w", 60)
        assert claimed is not None
        result = StudyResult(study_uid=claimed.study_uid, status="not_eligible", reason="test")
        assert worklist.queue.complete_study(claimed.study_uid, "w", result) == "not_eligible"
    time.sleep(0.2)
    assert purge(settings, worklist) == 2
    assert outside.is_file()
    assert list((storage / "spool").iterdir()) == []  # emptied folders removed too
    assert (storage / "spool").is_dir()
    assert worklist.queries.list_worklist() == []
    worklist.dispose()


def test_worker_pass_writes_sr_and_a_scaled_down_sc_and_pm(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    import numpy as np

    from triage_core.dicom_out import default_device_uid, findings_from_sr, heatmap_from_pm
    from triage_core.inference import Predictor
    from triage_core.models import weights_digest

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
        worklist.ingest.record_instance(study_uid, str(ds.SOPInstanceUID), path)
    worklist.queue.queue_stable_studies(0.0)
    claimed = worklist.queue.claim_study("w", 60)
    assert claimed is not None
    outputs = OutputsProcess()
    outputs.start()
    predictor = Predictor(tiny_checkpoint, mode="eager")
    processing = Processing(
        settings,
        worklist,
        Wakeups(worklist, shared=False, poll=0.2),
        "test-node",
        predictor=predictor,
        outputs=outputs,
    )
    try:
        outcome = processing.process_claimed(claimed)
    finally:
        outputs.stop()
    assert outcome.status == "done"
    sr_path, sc_path, pm_path = outcome.outputs
    assert sr_path.parent == storage / "outbox" / study_uid
    sr, sc, pm = (pydicom.dcmread(p) for p in (sr_path, sc_path, pm_path))
    assert sr.Modality == "SR" and sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert max(sc.Rows, sc.Columns) == 96  # sc_max_side, from a 256 px source
    # the Parametric Map: the same map on the same grid as the SC, the same source image
    assert pm.SOPClassUID == pydicom.uid.ParametricMapStorage
    assert (pm.Rows, pm.Columns) == (sc.Rows, sc.Columns)
    assert (
        pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        .ReferencedSOPInstanceUID == sc.SourceImageSequence[0].ReferencedSOPInstanceUID
    )  # fmt: skip
    heatmap = heatmap_from_pm(pm)
    assert 0.0 <= heatmap.min() and heatmap.max() == pytest.approx(1.0)  # scaled to its peak
    assert np.isfinite(heatmap).all()
    # every object names the model with a Device UID from its identity and weights
    device_uid = default_device_uid(predictor.spec, weights_digest(tiny_checkpoint))
    for ds in (sr, sc, pm):
        uids = {str(e.get("DeviceUID", "")) for e in ds.ContributingEquipmentSequence}
        assert device_uid in uids, ds.Modality
    detail = worklist.queries.study_detail(study_uid)
    assert detail is not None
    stored = {name: f["probability"] for name, f in detail["findings"].items()}
    assert {k: v[0] for k, v in findings_from_sr(sr).items()} == pytest.approx(stored)
    assert len(worklist.deliveries.claim_due(lease_seconds=60)) == 3  # SR, SC, PM; one PACS
    worklist.dispose()


@pytest.mark.parametrize(("output_maps", "expected"), [("sc", ["SR", "SC"]), ("pm", ["SR", "PM"])])
def test_output_maps_chooses_sc_or_pm(
    output_maps: str, expected: list[str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from triage_core.inference import Predictor

    settings = load_settings(
        None,
        {
            "storage": tmp_path / "storage",
            "workers": 0,
            "output_maps": output_maps,
            "destinations": ["PACS@127.0.0.1:11112", "VIEWER@127.0.0.1:11113"],
        },
    )
    worklist = open_worklist(settings)
    study_uid = _record_study(worklist, tmp_path, seed=3, size=128)
    worklist.queue.queue_stable_studies(0.0)
    claimed = worklist.queue.claim_study("w", 60)
    assert claimed is not None
    processing = Processing(
        settings,
        worklist,
        Wakeups(worklist, shared=False, poll=0.2),
        "test-node",
        predictor=Predictor(tiny_checkpoint, mode="eager"),
    )  # outputs built in this process
    outcome = processing.process_claimed(claimed)
    assert outcome.status == "done"
    kinds = {
        pydicom.uid.ParametricMapStorage: "PM",
        pydicom.uid.SecondaryCaptureImageStorage: "SC",
    }
    found = [kinds.get(pydicom.dcmread(p).SOPClassUID, "SR") for p in outcome.outputs]
    assert found == expected
    rows = worklist.deliveries.claim_due(lease_seconds=60)
    assert len(rows) == 2 * len(expected)  # one row per object and destination
    assert {r.study_uid for r in rows} == {study_uid}
    worklist.dispose()


def test_output_maps_setting_is_validated(tmp_path: Path) -> None:
    from triage_core.errors import ConfigError

    with pytest.raises(ConfigError, match="output_maps"):
        load_settings(None, {"storage": tmp_path, "output_maps": "png"})


def _record_study(worklist: Any, folder: Path, seed: int, size: int = 32) -> str:
    path = synthetic_cr(folder / f"{seed}.dcm", size=size, seed=seed)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    worklist.ingest.record_instance(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), path)
    return str(ds.StudyInstanceUID)


def _wait_status(worklist: Any, study_uid: str, statuses: set[str], timeout: float) -> float:
    """Seconds until the study reached one of ``statuses``; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        detail = worklist.queries.study_detail(study_uid)
        if detail is not None and detail["status"] in statuses:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"study {study_uid} not {statuses} after {timeout} s")


def test_an_idle_worker_is_woken_by_a_queued_study_not_by_a_poll(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from triage_core.inference import Predictor

    settings = load_settings(None, {"storage": tmp_path / "storage", "workers": 1})
    worklist = open_worklist(settings)
    wakeups = Wakeups(worklist, shared=False, poll=0.2)
    wakeups.fallback = 120.0  # a poll would take two minutes: only the wake-up can be quick
    processing = Processing(
        settings, worklist, wakeups, "node", predictor=Predictor(tiny_checkpoint, mode="eager")
    )
    processing.start()
    try:
        time.sleep(0.5)  # the worker found nothing and sleeps
        study_uid = _record_study(worklist, tmp_path, seed=1, size=64)
        assert worklist.queue.queue_stable_studies(0.0) == [study_uid]
        assert _wait_status(worklist, study_uid, {"done", "not_eligible"}, 30.0) < 30.0
        assert processing.processed == 1
    finally:
        processing.stop(time.monotonic() + 10)
    assert not any(t.is_alive() for t in processing._workers)  # woken at stop, not at 120 s
    worklist.dispose()


def test_stable_studies_are_queued_after_stable_age_without_polling(tmp_path: Path) -> None:
    from dicom_node.stages.jobs import StableStudies

    settings = load_settings(None, {"storage": tmp_path / "storage", "stable_age": 0.5})
    worklist = open_worklist(settings)
    wakeups = Wakeups(worklist, shared=False, poll=0.2)
    wakeups.fallback = 120.0
    stable = StableStudies(settings, worklist, wakeups)
    stable.start()
    try:
        time.sleep(0.3)  # nothing receiving: the thread sleeps (up to the fallback)
        study_uid = _record_study(worklist, tmp_path, seed=2)  # the instance wakes it
        seconds = _wait_status(worklist, study_uid, {"queued"}, 10.0)
        assert 0.3 <= seconds < 3.0, seconds  # stable_age after the instance, not 120 s
    finally:
        stop_at = time.monotonic()
        stable.stop(stop_at + 10)
    assert time.monotonic() - stop_at < 2.0
    worklist.dispose()


def test_one_lease_keeper_renews_every_lease_of_its_process(tmp_path: Path) -> None:
    from dicom_node.stages.process import LeaseKeeper

    settings = load_settings(None, {"storage": tmp_path / "storage", "workers": 0})
    worklist = open_worklist(settings)
    for i in range(3):
        _record_study(worklist, tmp_path, seed=10 + i)
    worklist.queue.queue_stable_studies(0.0)
    claims = [worklist.queue.claim_study(w, 2.0) for w in ("node/w0", "node/w1", "other/w0")]
    assert all(c is not None for c in claims)
    keeper = LeaseKeeper(worklist, ["node/w0", "node/w1"], lease_seconds=600.0)
    renewed = keeper.renew_all()  # one statement for the whole process
    ours = sorted(c.study_uid for c in claims[:2] if c is not None)
    assert renewed == ours
    expiry = {
        c.study_uid: worklist.queries.study_detail(c.study_uid)["lease_expires_at"]  # type: ignore[index]
        for c in claims
        if c is not None
    }
    other = claims[2]
    assert other is not None
    assert all(expiry[uid] > expiry[other.study_uid] for uid in ours)  # +600 s against +2 s
    worklist.dispose()


def test_delivery_thread_does_not_spin_when_the_database_fails(tmp_path: Path) -> None:
    """Due deliveries that cannot be claimed (database error) are retried after a pause, not in
    a busy loop."""
    from dicom_node.stages.deliver import Delivery
    from triage_core.errors import WorklistError

    settings = load_settings(None, {"storage": tmp_path / "storage", "workers": 0})
    worklist = open_worklist(settings)
    calls: list[float] = []

    def failing_claim(*_args: Any, **_kwargs: Any) -> Any:
        calls.append(time.monotonic())
        raise WorklistError("database is locked")

    worklist.deliveries.claim_due = failing_claim  # type: ignore[method-assign]
    worklist.deliveries.next_due_in = lambda now=None: 0.0  # type: ignore[method-assign]
    delivery = Delivery(settings, worklist, Wakeups(worklist, shared=False, poll=0.2))
    delivery.start()
    try:
        time.sleep(1.5)
    finally:
        delivery.stop(time.monotonic() + 5)
    assert 1 <= len(calls) <= 3, len(calls)  # one look per ERROR_WAIT (1 s), not thousands
    worklist.dispose()


def test_device_uid_follows_the_weights_and_the_version(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    import shutil

    from dicom_node.stages.record import OutputsRecorder
    from triage_core.dicom_out import default_device_uid
    from triage_core.models import read_spec

    settings = load_settings(None, {"storage": tmp_path / "storage", "workers": 0})
    worklist = open_worklist(settings)
    recorder = OutputsRecorder(settings, worklist)
    spec = read_spec(tiny_checkpoint)
    uid = recorder.device_uid(spec, tiny_checkpoint)
    assert uid == recorder.device_uid(spec, tiny_checkpoint)  # stable (digest read once)
    assert uid != default_device_uid(spec)  # the weights' digest is part of it
    assert recorder.device_uid(spec.replace(version="1"), tiny_checkpoint) != uid  # new version
    # the same spec with other weights: another UID
    other = tmp_path / "other"
    shutil.copy(tiny_checkpoint.with_suffix(".json"), other.with_suffix(".json"))
    data = bytearray(tiny_checkpoint.with_suffix(".safetensors").read_bytes())
    data[-1] ^= 0xFF
    other.with_suffix(".safetensors").write_bytes(bytes(data))
    assert recorder.device_uid(spec, other) not in (uid, default_device_uid(spec))
    # weights that cannot be read: the spec's UID, with a warning (never a crash)
    assert recorder.device_uid(spec, tmp_path / "missing") == default_device_uid(spec)
    worklist.dispose()
