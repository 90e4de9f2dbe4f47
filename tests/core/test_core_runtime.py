"""The serving runtime (ONNX Runtime) against the torch runtime, and the export's self-check.

Real images from ../shared/data go through both runtimes of one checkpoint (the tiny random
ResNet-18 of ``conftest.py``, exported with its graph); the numpy preprocessing is compared with
the torch implementation it replaced, bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.onnx_export import OnnxExportError, check_inputs, export_onnx
from triage_core.cam import CamExplainer, FeatureCam
from triage_core.errors import CheckpointError, SpecMismatchError
from triage_core.imaging import (
    EXPORT_SIZE,
    export_resize,
    letterbox_geometry,
    load_image,
    to_array,
)
from triage_core.inference import Predictor
from triage_core.models import default_spec, load_checkpoint, read_spec, save_checkpoint
from triage_core.resample import _aa_weights, resize_antialiased
from triage_core.runtime import OnnxModel, SessionOptions, onnx_path


def _torch_to_tensor(image: np.ndarray, spec) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The torch implementation of ``to_tensor`` before the serving runtime (the reference)."""
    height, width = image.shape
    if max(height, width) > EXPORT_SIZE:
        export = letterbox_geometry(height, width, EXPORT_SIZE)
        image = export_resize(image, export.new_h, export.new_w)
        height, width = image.shape
    box = letterbox_geometry(height, width, spec.input_size)
    src = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if (box.new_h, box.new_w) != (height, width):
        src = F.interpolate(
            src, size=(box.new_h, box.new_w), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    canvas = torch.zeros((1, spec.input_size, spec.input_size), dtype=torch.float32)
    canvas[:, box.top : box.top + box.new_h, box.left : box.left + box.new_w] = src[0]
    out = canvas.expand(3, -1, -1).clone()
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return out.sub_(mean).div_(std)


@pytest.mark.parametrize("sizes", [(256, 224), (224, 256), (100, 224), (64, 7), (17, 256)])
def test_antialiased_weights_are_torchs(sizes: tuple[int, int]) -> None:
    n_in, n_out = sizes
    eye = torch.eye(n_in, dtype=torch.float32)[:, None, None, :]
    theirs = F.interpolate(
        eye, size=(1, n_out), mode="bilinear", antialias=True, align_corners=False
    )[:, 0, 0, :].numpy()
    assert np.array_equal(_aa_weights(n_in, n_out), theirs.T)


def test_to_array_equals_the_torch_preprocessing(dicom_dir: Path, cxr14_dir: Path) -> None:
    spec = default_spec("efficientnet_lite0")
    files = sorted(dicom_dir.glob("*.dcm"))[:6] + sorted((cxr14_dir / "full").glob("*.png"))[:3]
    files += sorted((cxr14_dir / "256").glob("*.png"))[:3]
    rng = np.random.default_rng(0)
    images = [load_image(p) for p in files]
    images += [rng.random(s).astype(np.float32) for s in [(100, 50), (70, 60), (300, 20), (9, 9)]]
    for image in images:
        ours = to_array(image, spec)
        assert ours.dtype == np.float32 and ours.shape == (3, 224, 224)
        assert np.array_equal(ours, _torch_to_tensor(image, spec).numpy())
    with pytest.raises(ValueError, match="2-D"):
        resize_antialiased(np.zeros((2, 2, 2), np.float32), 4, 4)


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint: Path, dicom_dir: Path, cxr14_dir: Path) -> np.ndarray:
    spec = read_spec(tiny_checkpoint)
    return check_inputs([dicom_dir, cxr14_dir / "full"], spec, limit=12)


def test_onnx_runtime_matches_torch(
    tiny_checkpoint: Path, inputs: np.ndarray, dicom_dir: Path
) -> None:
    ort = Predictor(tiny_checkpoint, runtime="onnxruntime", batch_size=5)
    ref = Predictor(tiny_checkpoint, runtime="torch", mode="eager", batch_size=5)
    assert ort.mode == "onnxruntime" and ort.to_dict()["runtime"] == "onnxruntime"
    p_ort, f_ort = ort.predict_with_features(inputs)
    p_ref, f_ref = ref.predict_with_features(torch.from_numpy(inputs))
    assert f_ort is not None and f_ref is not None and f_ort.shape == f_ref.shape
    assert np.abs(p_ort - p_ref).max() <= 1e-4
    assert np.abs(f_ort - f_ref).max() <= 1e-3
    thresholds = np.asarray(ort.spec.thresholds)
    assert np.array_equal(p_ort >= thresholds, p_ref >= thresholds)
    assert np.array_equal(ort.predict_tensors(inputs), p_ort)
    assert ort.predict_logits(inputs[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="batch"):
        ort.predict_tensors(inputs[:, :, :10])
    # CAM: the closed form from the graph's features = pytorch_grad_cam on the torch model
    explainer, gradcam = ort.explainer(), CamExplainer(ref.model, ref.spec)
    assert isinstance(explainer, FeatureCam) and explainer is ort.explainer()
    for i in range(3):
        for k in range(3):
            ours = explainer.map_from_features(f_ort[i], k)
            assert np.abs(ours - gradcam.square_map(inputs[i], k)).max() <= 1e-3
            assert np.abs(explainer.square_map(inputs[i], k) - ours).max() <= 1e-5
    image = load_image(sorted(dicom_dir.glob("*.dcm"))[0])
    result = explainer.explain(image, 1, max_side=128)
    assert result.overlay.dtype == np.uint8 and max(result.overlay.shape[:2]) == 128


def test_sessions_are_created_once_per_process(tiny_checkpoint: Path) -> None:
    a = Predictor(tiny_checkpoint, runtime="onnxruntime", threads=1)
    b = Predictor(tiny_checkpoint, runtime="onnxruntime", threads=1)
    c = Predictor(tiny_checkpoint, runtime="onnxruntime", session=SessionOptions(threads=2))
    sa, sb, sc = (p.backend for p in (a, b, c))
    assert isinstance(sa, OnnxModel) and isinstance(sb, OnnxModel) and isinstance(sc, OnnxModel)
    assert sa.session is sb.session
    assert sc.session is not sa.session  # other options, another session
    with pytest.raises(ValueError, match="optimization"):
        SessionOptions(optimization="max")
    with pytest.raises(ValueError, match="CPU"):
        Predictor(tiny_checkpoint, runtime="onnxruntime", device="cuda")
    with pytest.raises(ValueError, match="unknown runtime"):
        Predictor(tiny_checkpoint, runtime="tensorflow")
    with pytest.raises(RuntimeError, match="no torch module"):
        _ = a.model


def test_a_stale_or_mismatched_graph_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    model, spec = load_checkpoint(tiny_checkpoint)
    name = tmp_path / "copy"
    save_checkpoint(model, spec, name)  # same tensors: the graph still fits
    shutil.copy(onnx_path(tiny_checkpoint), onnx_path(name))
    Predictor(name, runtime="onnxruntime")
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    save_checkpoint(model, spec, name)  # other weights: the old graph is stale
    with pytest.raises(SpecMismatchError, match="weights_sha256.*re-export"):
        Predictor(name, runtime="onnxruntime")
    save_checkpoint(model, spec.replace(input_size=96), name)
    with pytest.raises(SpecMismatchError, match="input_size"):
        Predictor(name, runtime="onnxruntime")
    onnx_path(name).unlink()
    with pytest.raises(CheckpointError, match="training.export --onnx"):
        Predictor(name, runtime="onnxruntime")
    onnx_path(name).write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="not a loadable ONNX graph"):
        Predictor(name, runtime="onnxruntime")


def test_export_refuses_a_graph_that_fails_its_check(
    tiny_checkpoint: Path, tmp_path: Path, inputs: np.ndarray
) -> None:
    model, spec = load_checkpoint(tiny_checkpoint)
    name = save_checkpoint(model, spec, tmp_path / "strict")
    with pytest.raises(OnnxExportError, match="disagrees with torch"):
        export_onnx(name, inputs[:2], prob_tolerance=-1.0)
    assert not onnx_path(name).exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(OnnxExportError, match="do not fit"):
        export_onnx(name, inputs[:2, :, :32, :32])
    check = export_onnx(name, inputs[:2])
    assert check["decision_flips"] == 0 and check["opset"] == 17
    assert check["max_abs_probability_difference"] <= 1e-4
    assert check["max_abs_cam_difference"] <= 1e-3
    assert Predictor(name, runtime="onnxruntime").predict_tensors(inputs[:2]).shape == (2, 3)


def test_export_command_line(tiny_checkpoint: Path, tmp_path: Path, dicom_dir: Path) -> None:
    from training import export

    model, spec = load_checkpoint(tiny_checkpoint)
    name = save_checkpoint(model, spec, tmp_path / "cli")
    with pytest.raises(SystemExit):  # --check-images is required with --onnx
        export.main(["--onnx", "--model", str(name)])
    assert export.main(["--onnx", "--model", str(name), "--check-images", str(dicom_dir)]) == 0
    assert onnx_path(name).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export.main(["--onnx", "--model", str(name), "--check-images", str(empty)]) == 2


def test_the_shipped_default_has_a_valid_graph() -> None:
    """Whatever the weights: the shipped checkpoint's graph fits its spec and its weights."""
    predictor = Predictor(runtime="onnxruntime")
    size = predictor.spec.input_size
    probs, features = predictor.predict_with_features(np.zeros((2, 3, size, size), np.float32))
    assert probs.shape == (2, predictor.spec.num_classes) and features is not None
    assert np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()
