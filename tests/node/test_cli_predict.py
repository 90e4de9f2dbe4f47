"""``triage predict`` on real DICOM files, broken inputs and PNGs (random 64 px model)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from dicom_node.commands import predict
from triage_core.errors import CommandError

CHEST = [
    "RG1_J2KI.dcm",
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "Fake_MONOHR1.dcm",
]
HIP = ["RG2_JPLY_fixed.dcm", "RG2_JLSL.dcm"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="triage predict")
    predict.add_arguments(parser)
    return predict.run(parser.parse_args(argv))


@pytest.fixture
def broken(dicom_dir: Path, tmp_path: Path) -> list[Path]:
    data = (dicom_dir / "RG1_UNCR.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) // 3])
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    return [truncated, text]


def test_mixed_inputs_json_lines(
    dicom_dir: Path,
    tiny_checkpoint: Path,
    broken: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inputs = [dicom_dir / CHEST[0], dicom_dir / HIP[0], broken[0], dicom_dir / CHEST[1]]
    inputs += [broken[1], dicom_dir / CHEST[2]]
    cam_dir = tmp_path / "cams"
    rc = _run(["--model", str(tiny_checkpoint), "--cam-dir", str(cam_dir), *map(str, inputs)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(inputs)
    records = [json.loads(line) for line in lines]
    assert [r["path"] for r in records] == [str(p) for p in inputs]
    classes = ["Atelectasis", "Effusion", "Infiltration"]
    for record in records:
        assert record["model"] == {"name": "random-test-model", "version": "0"}
        for key in ("eligible", "reason", "probabilities", "findings"):
            assert key in record
        assert "priority_score" in record and "priority_level" in record
    eligible = [records[i] for i in (0, 3, 5)]
    for record in eligible:
        assert record["eligible"] is True and "error" not in record
        assert list(record["probabilities"]) == classes
        assert all(0.0 < p < 1.0 for p in record["probabilities"].values())
        present = [c for c in classes if record["probabilities"][c] >= 0.5]
        assert record["findings"] == present
        assert 0.0 <= record["priority_score"] <= 100.0
        assert record["priority_level"] in ("routine", "urgent", "critical")
        # the tiny model has no OOD reference: no score, never flagged
        assert record["ood_score"] is None and record["low_confidence"] is False
        # one overlay PNG per eligible input, at the source resolution
        cam = Path(record["cam"])
        assert cam.parent == cam_dir and cam.suffix == ".png"
        with Image.open(cam) as png:
            assert png.mode == "RGB"
            size = png.size
        rows, cols = (1955, 1841) if "RG1" in record["path"] else (1024, 1024)
        assert size == (cols, rows)
    hip = records[1]
    assert hip["eligible"] is False and hip["reason"] == "body part HIP"
    assert hip["probabilities"] == {} and hip["findings"] == [] and "error" not in hip
    assert hip["priority_score"] is None
    for record in (records[2], records[4]):
        assert record["eligible"] is False
        assert record["error"] and Path(record["path"]).name in record["error"]
        assert "cam" not in record
    assert len(list(cam_dir.iterdir())) == 3


def test_table_format(
    dicom_dir: Path, tiny_checkpoint: Path, broken: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = [dicom_dir / CHEST[1], dicom_dir / HIP[1], broken[1]]
    rc = _run(["--model", str(tiny_checkpoint), "--format", "table", *map(str, inputs)])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PATH") and "PRIORITY" in out[0]
    assert " ok " in out[1] and "Atelectasis" in out[1]
    assert "not eligible" in out[2] and "body part HIP" in out[2]
    assert "error" in out[3]
    assert out[-1].startswith("model: random-test-model v0")


def test_png_input_and_directory(
    cxr14_dir: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pngs"
    folder.mkdir()
    for png in sorted((cxr14_dir / "256").glob("*.png"))[:2]:
        (folder / png.name).symlink_to(png)
    rc = _run(["--model", str(tiny_checkpoint), "--batch-size", "1", str(folder)])
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 2
    assert all(r["eligible"] and len(r["probabilities"]) == 3 for r in records)


def test_exit_1_when_nothing_readable(
    tiny_checkpoint: Path, broken: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(CommandError) as caught:  # cli.main prints it and exits with its status
        _run(["--model", str(tiny_checkpoint), *map(str, broken)])
    assert caught.value.status == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "no input could be read" in str(caught.value)


def test_exit_2_on_model_problems(
    dicom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(CommandError) as caught:
        _run(["--model", str(tmp_path / "missing"), str(dicom_dir / CHEST[1])])
    assert caught.value.status == 2
    assert "missing" in str(caught.value)
    from triage_core.errors import CheckpointError
    from triage_core.models import default_checkpoint_path

    try:
        default_checkpoint_path()
    except CheckpointError:
        with pytest.raises(CommandError) as caught:
            _run([str(dicom_dir / CHEST[1])])
        assert caught.value.status == 2
        assert "--model" in str(caught.value)
    else:
        # a default model is shipped: without --model it is used, and named in the output
        from triage_core.models import read_spec

        rc = _run([str(dicom_dir / CHEST[1])])
        assert rc == 0
        record = json.loads(capsys.readouterr().out)
        spec = read_spec(default_checkpoint_path())
        assert record["model"] == {"name": spec.name, "version": spec.version}


def test_through_the_triage_command(
    dicom_dir: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node import cli

    try:
        parser = cli.build_parser(["predict"])
    except ImportError as exc:
        pytest.skip(f"another subcommand is not importable yet: {exc}")
    args = parser.parse_args(["predict", "--model", str(tiny_checkpoint), str(dicom_dir / HIP[0])])
    assert args._module == "dicom_node.commands.predict"
    assert cli.main(["predict", "--model", str(tiny_checkpoint), str(dicom_dir / HIP[0])]) == 0
    assert json.loads(capsys.readouterr().out)["reason"] == "body part HIP"


def test_low_confidence_in_json_and_table(
    dicom_dir: Path,
    cxr14_dir: Path,
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A checkpoint with an OOD reference (fitted on chest PNGs, threshold set between the
    chest films' scores and a noise image's): the noise image is flagged, the chest one is not."""
    import numpy as np
    import torch

    from triage_core import ood
    from triage_core.imaging import load_image, to_tensor
    from triage_core.models import load_checkpoint, save_checkpoint
    from triage_core.runtime import onnx_path

    model, spec = load_checkpoint(tiny_checkpoint)
    pngs = sorted((cxr14_dir / "256").glob("*.png"))[:24]
    tensors = torch.stack([to_tensor(load_image(p), spec) for p in pngs])
    reference = ood.fit_reference(model, spec, tensors, components=4, quantile=0.99)
    noise = tmp_path / "noise.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(noise)
    chest = dicom_dir / CHEST[1]
    with_ood = spec.replace(ood=reference)
    scores = ood.scores_from_features(
        with_ood,
        ood.pooled_features(
            model, spec, torch.stack([to_tensor(load_image(p), spec) for p in (chest, noise)])
        ),
    )
    assert scores is not None and scores[1] > scores[0]
    limit = float((scores[0] + scores[1]) / 2)
    checkpoint = save_checkpoint(
        model, with_ood.replace(ood={**reference, "threshold": limit}), tmp_path / "ood"
    )
    # same weights, same serving graph (its metadata names the weights' digest, not the spec)
    shutil.copy(onnx_path(tiny_checkpoint), onnx_path(checkpoint))
    assert _run(["--model", str(checkpoint), str(chest), str(noise)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["low_confidence"] for r in records] == [False, True]
    assert records[0]["ood_score"] < limit < records[1]["ood_score"]
    assert _run(["--model", str(checkpoint), "--format", "table", str(chest), str(noise)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert " ok " in out[1] and "LOW CONFIDENCE" in out[2]
    assert out[-1].startswith("LOW CONFIDENCE: the image is unlike")
