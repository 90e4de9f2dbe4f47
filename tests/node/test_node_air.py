"""AI results as IHE AIR describes them, end to end: ``triage serve`` as a real subprocess, a
shared chest DICOM in by DCMTK storescu, the SR, the SC and the Parametric Map out to a DCMTK
storescp.

The model is the random-weight tiny checkpoint with every threshold at 0 (plumbing only: every
finding is then judged present, so each gets its image region in the SR). The map the node
sent is compared with the one the same pipeline computes here, in this process, on the same
file with the same checkpoint and runtime.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_node_support import (
    DCIODVFY,
    ServeProcess,
    free_port,
    needs_dcmtk,
    storescp_destination,
    storescu,
)

pytestmark = needs_dcmtk

CHEST = "RG1_UNCR.dcm"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def all_present_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random ResNet-18 at 64 px with thresholds 0 (every finding present), with its
    ONNX serving graph."""
    import torch

    from training.onnx_export import export_onnx
    from triage_core.models import create_model, default_spec, save_checkpoint

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3, pretrained=None)
    spec = default_spec("resnet18").replace(
        input_size=64, name="all-present-test-model", version="3", thresholds=[0.0, 0.0, 0.0]
    )
    path = tmp_path_factory.mktemp("ckpt") / "all_present"
    save_checkpoint(model, spec, path)
    noise = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    export_onnx(path, noise)
    return path


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
    return errors if errors or proc.returncode == 0 else [proc.stderr or "dciodvfy failed"]


def _wait(out: Path, count: int, proc: ServeProcess, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(p for p in out.glob("*") if p.is_file())
        if len(files) >= count:
            time.sleep(0.5)  # storescp renames a file once it is complete
            return sorted(p for p in out.glob("*") if p.is_file())
        time.sleep(0.25)
    raise AssertionError(f"{count} objects not received in {timeout} s\n{proc.log()[-6000:]}")


@pytest.fixture
def serve(tmp_path: Path, all_present_checkpoint: Path) -> Iterator[tuple[ServeProcess, int, int]]:
    port, dest = free_port(), free_port()
    args = [
        "serve",
        "--port", str(port),
        "--bind-address", "127.0.0.1",
        "--storage", str(tmp_path / "storage"),
        "--model", str(all_present_checkpoint),
        "--stable-age", "1",
        "--http-port", "0",
        "--destination", f"PACS@127.0.0.1:{dest}",
        "--threads", "1",
    ]  # fmt: skip
    proc = ServeProcess(args, tmp_path / "serve.log")
    try:
        yield proc, port, dest
    finally:
        proc.stop()


def test_chest_study_gets_sr_with_regions_sc_and_parametric_map(
    serve: tuple[ServeProcess, int, int],
    all_present_checkpoint: Path,
    dicom_dir: Path,
    tmp_path: Path,
) -> None:
    import highdicom as hd

    from triage_core.dicom_out import (
        cam_region,
        default_device_uid,
        findings_from_sr,
        heatmap_from_pm,
        regions_from_sr,
    )
    from triage_core.dicom_out.pm import PM_MAX_STORED
    from triage_core.inference import Predictor
    from triage_core.models import weights_digest
    from triage_core.pipeline import triage_study

    proc, port, dest = serve
    source_path = dicom_dir / CHEST
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    out = tmp_path / "pacs"
    with storescp_destination(out, dest):
        proc.start()
        proc.wait_ready(port)
        sent = storescu(port, [source_path])
        assert sent.returncode == 0, sent.stderr
        received = _wait(out, 3, proc, 180)
    assert len(received) == 3, [p.name for p in received]
    for path in received:
        assert _dciodvfy_errors(path) == [], path.name
    objects = {str(ds.SOPClassUID): ds for ds in map(pydicom.dcmread, received)}
    pm, sc = objects.pop(PM_CLASS), objects.pop(SC_CLASS)
    (sr,) = objects.values()
    assert sr.Modality == "SR"
    for ds in (sr, sc, pm):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert len({sr.SeriesInstanceUID, sc.SeriesInstanceUID, pm.SeriesInstanceUID}) == 3

    # the same pipeline here, on the same file: the map the node sent is the one it computed
    predictor = Predictor(all_present_checkpoint, runtime="onnxruntime")
    expected = triage_study(
        str(source.StudyInstanceUID),
        [(str(source.SOPInstanceUID), source_path)],
        predictor,
        cam_max_side=512,  # the node's default sc_max_side
    )
    assert expected.cam_heatmap is not None and expected.cam_finding is not None
    sent_map = heatmap_from_pm(pm)
    assert sent_map.shape == expected.cam_heatmap.shape == (int(sc.Rows), int(sc.Columns))
    assert np.abs(sent_map - expected.cam_heatmap).max() <= 0.5 / PM_MAX_STORED + 1e-5
    derived = pm.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    hd.pm.ParametricMap.from_dataset(pm)
    hd.sr.Comprehensive3DSR.from_dataset(sr)

    # the SR: every finding present, each with its region on the source image
    findings = findings_from_sr(sr)
    assert all(present for _, present in findings.values()) and len(findings) == 3
    regions = regions_from_sr(sr)
    assert set(regions) == set(findings)
    for name, region in regions.items():
        source_uid, heatmap = expected.finding_maps[name]
        assert region.source_uid == source_uid == source.SOPInstanceUID
        again = cam_region(heatmap, int(source.Rows), int(source.Columns), source_uid)
        assert again is not None
        got = (region.left, region.top, region.right, region.bottom)
        assert got == pytest.approx((again.left, again.top, again.right, again.bottom), rel=1e-5)
        assert 0 <= region.left < region.right <= source.Columns
        assert 0 <= region.top < region.bottom <= source.Rows

    # one Device UID on all three: the model's identity and its weights' digest
    uid = default_device_uid(predictor.spec, weights_digest(all_present_checkpoint))
    for ds in (sr, sc, pm):
        algorithm = [
            item
            for item in ds.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
        ]
        assert [item.DeviceUID for item in algorithm] == [uid], ds.Modality
    assert "stage=outputs 3 object(s)" in proc.log()
