"""NodeService parts without the network: retention purge, worker pass on a claimed study."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from test_node_support import synthetic_cr

from dicom_node.service import NodeService, open_worklist
from dicom_node.settings import load_settings
from triage_core.spec import StudyResult


def test_retention_purge_deletes_finished_studies_inside_storage(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    settings = load_settings(None, {"storage": storage, "retention_days": 1e-6, "workers": 0})
    service = NodeService(settings, role="serve")
    service.worklist = open_worklist(settings)
    worklist = service.worklist
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
    assert service.purge() == 2
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
    service = NodeService(settings, role="worker")
    service.worklist = open_worklist(settings)
    worklist = service.worklist
    study_uid = pydicom.uid.generate_uid()
    for i in range(2):
        path = synthetic_cr(tmp_path / f"{i}.dcm", study_uid=study_uid, size=256, seed=i)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        worklist.record_instance(study_uid, str(ds.SOPInstanceUID), path)
    worklist.queue_stable_studies(0.0)
    claimed = worklist.claim_study("w", 60)
    assert claimed is not None
    predictor = Predictor(tiny_checkpoint, mode="eager")
    service._start_output_pool()
    try:
        outcome = service.process_claimed(claimed, predictor)
    finally:
        assert service._output_pool is not None
        service._output_pool.shutdown()
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
