"""``triage predict`` and the serving path run one triage chain: the same DICOM file gives the
same probabilities, findings, priority, OOD score and CAM through both (random 64 px model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_node import cli
from triage_core.inference import Predictor
from triage_core.pipeline import triage_study

CHEST = [
    "RG1_J2KI.dcm",
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "Fake_MONOHR1.dcm",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", CHEST)
def test_predict_gives_what_serving_gives(
    name: str,
    dicom_dir: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = dicom_dir / name
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    # the serving path: what a worker runs on a claimed study (the node's default runtime)
    served = triage_study(
        str(ds.StudyInstanceUID),
        [(str(ds.SOPInstanceUID), path)],
        Predictor(tiny_checkpoint, runtime="onnxruntime"),
    )
    result = served.result
    assert result.status == "done"
    (image,) = result.images

    cam_dir = tmp_path / "cams"
    argv = ["predict", "--format", "json", "--model", str(tiny_checkpoint), "--cam-dir"]
    assert cli.main([*argv, str(cam_dir), str(path)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)

    assert record["eligible"] is True and record["reason"] == image.reason == ""
    assert record["probabilities"] == {n: round(p, 4) for n, p in image.probabilities.items()}
    assert record["findings"] == [f.name for f in result.findings if f.present]
    assert record["priority_score"] == result.priority_score
    assert record["priority_level"] == result.priority_level
    assert record["ood_score"] == image.ood_score and record["low_confidence"] is False
    assert record["model"] == {"name": result.model_name, "version": result.model_version}
    # the same overlay, on the same image, of the same finding
    top = result.top_finding
    assert top is not None and Path(record["cam"]).name.endswith(f"_cam_{top.name}.png")
    with Image.open(record["cam"]) as png:
        assert served.cam_overlay is not None
        assert np.array_equal(np.asarray(png), served.cam_overlay)
