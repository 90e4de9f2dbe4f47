"""Predictor calibration, batching and execution paths; study aggregation (random weights)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from triage_core.imaging import to_tensor
from triage_core.inference import MODES, Predictor, aggregate_study, calibrate
from triage_core.models import create_model, default_spec
from triage_core.spec import ImageResult, ModelSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(arch: str = "resnet18", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(arch).eval()


def _spec(arch: str = "resnet18", **changes: object) -> ModelSpec:
    return default_spec(arch).replace(input_size=64, **changes)


def _batch(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=gen)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_temperature_is_applied(task: str) -> None:
    model = _model()
    spec = _spec(task=task, temperature=2.5)
    predictor = Predictor(model=model, spec=spec, mode="eager")
    x = _batch(4)
    with torch.inference_mode():
        logits = model(x)
    expected = (logits / 2.5).softmax(1) if task == "multiclass" else (logits / 2.5).sigmoid()
    probs = predictor.predict_tensors(x)
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs, expected.numpy(), atol=1e-6)
    # and it is not the uncalibrated answer
    uncalibrated = logits.softmax(1) if task == "multiclass" else logits.sigmoid()
    assert np.abs(probs - uncalibrated.numpy()).max() > 1e-3
    if task == "multiclass":
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_calibrate_refuses_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        calibrate(np.zeros((2, 4)), _spec())


def test_batch_size_invariance() -> None:
    model, spec = _model(), _spec(temperature=1.3)
    x = _batch(7)
    reference = Predictor(model=model, spec=spec, mode="eager", batch_size=16).predict_tensors(x)
    for size in (1, 3):
        probs = Predictor(model=model, spec=spec, mode="eager", batch_size=size).predict_tensors(x)
        np.testing.assert_allclose(probs, reference, atol=1e-5)
    # one image alone gives the same as inside a batch
    single = Predictor(model=model, spec=spec, mode="eager").predict_tensors(x[2:3])
    np.testing.assert_allclose(single[0], reference[2], atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("mode", ["channels_last", "bf16"])
def test_fast_paths_stay_close_to_eager(arch: str, mode: str) -> None:
    spec = _spec(arch)
    x = _batch(3)
    eager = Predictor(model=_model(arch), spec=spec, mode="eager").predict_tensors(x)
    fast = Predictor(model=_model(arch), spec=spec, mode=mode)
    assert fast.mode == mode
    probs = fast.predict_tensors(x)
    tolerance = 1e-4 if mode == "channels_last" else 0.02
    assert np.abs(probs - eager).max() < tolerance
    assert probs.dtype == np.float32


def test_auto_mode_resolves_per_device() -> None:
    predictor = Predictor(model=_model(), spec=_spec())
    assert predictor.mode in MODES and predictor.mode != "auto"
    assert predictor.to_dict()["mode"] == predictor.mode


def test_predict_images_letterboxes_like_to_tensor() -> None:
    model, spec = _model(), _spec()
    predictor = Predictor(model=model, spec=spec, mode="eager")
    rng = np.random.default_rng(0)
    images = [rng.random((90, 70), dtype=np.float32), rng.random((64, 128), dtype=np.float32)]
    probs = predictor.predict_images(images)
    expected = predictor.predict_tensors(torch.stack([to_tensor(im, spec) for im in images]))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert predictor.predict_images([]).shape == (0, 3)


def test_loads_a_checkpoint(tiny_checkpoint: Path) -> None:
    predictor = Predictor(tiny_checkpoint, mode="eager", batch_size=2)
    assert predictor.spec.name == "random-test-model"
    assert predictor.checkpoint == tiny_checkpoint
    probs = predictor.predict_tensors(_batch(3))
    assert probs.shape == (3, 3)
    assert ((probs > 0) & (probs < 1)).all()


def test_bad_arguments_are_refused(tiny_checkpoint: Path) -> None:
    spec = _spec()
    with pytest.raises(ValueError, match="mode"):
        Predictor(model=_model(), spec=spec, mode="turbo")
    with pytest.raises(ValueError, match="spec"):
        Predictor(model=_model())
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(model=_model(), spec=spec, batch_size=0)
    with pytest.raises(ValueError, match="either"):
        Predictor(tiny_checkpoint, model=_model(), spec=spec)
    predictor = Predictor(model=_model(), spec=spec, mode="eager")
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        predictor.predict_tensors(torch.zeros(2, 3, 32, 32))


def test_missing_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    from triage_core.errors import CheckpointError

    with pytest.raises(CheckpointError):
        Predictor(tmp_path / "nothing-here")


def test_threads_share_one_predictor() -> None:
    predictor = Predictor(model=_model(), spec=_spec(), mode="channels_last", batch_size=2)
    inputs = [_batch(3, seed=s) for s in range(4)]
    serial = [predictor.predict_tensors(x) for x in inputs]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = predictor.predict_tensors(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(4):
        np.testing.assert_allclose(results[i], serial[i], atol=1e-6)


def test_aggregation_keeps_the_source_image() -> None:
    spec = _spec(thresholds=[0.5, 0.3, 0.9])
    images = [
        ImageResult(
            "1.1", True, probabilities={"Atelectasis": 0.2, "Effusion": 0.7, "Infiltration": 0.1}
        ),
        ImageResult(
            "1.2", True, probabilities={"Atelectasis": 0.6, "Effusion": 0.1, "Infiltration": 0.1}
        ),
        # not eligible / errored images never count, however high their numbers
        ImageResult(
            "1.3",
            False,
            "lateral view",
            {"Atelectasis": 0.99, "Effusion": 0.99, "Infiltration": 0.99},
        ),
        ImageResult("1.4", False, "unreadable", error="truncated"),
    ]
    findings = aggregate_study(images, spec)
    by_name = {f.name: f for f in findings}
    assert [f.name for f in findings] == list(spec.class_names)
    assert by_name["Atelectasis"].source_uid == "1.2"
    assert by_name["Atelectasis"].probability == pytest.approx(0.6)
    assert by_name["Atelectasis"].present
    assert by_name["Effusion"].source_uid == "1.1"
    assert by_name["Effusion"].threshold == pytest.approx(0.3)
    assert by_name["Infiltration"].source_uid == "1.1"  # tie: the first image
    assert not by_name["Infiltration"].present
    assert aggregate_study(images[2:], spec) == ()


@pytest.mark.slow
def test_compile_serves_eager_until_ready() -> None:
    predictor = Predictor(model=_model(), spec=_spec(), mode="compile", batch_size=4)
    x = _batch(3)
    reference = Predictor(model=_model(), spec=_spec(), mode="eager").predict_tensors(x)
    thread = predictor.warmup(background=True)
    assert thread is not None
    early = predictor.predict_tensors(x)  # served by the non-compiled path meanwhile
    np.testing.assert_allclose(early, reference, atol=1e-4)
    thread.join(timeout=600)
    assert predictor.compiled_ready
    np.testing.assert_allclose(predictor.predict_tensors(x), reference, atol=1e-3)


def test_warmup_without_compile_is_a_plain_forward() -> None:
    predictor = Predictor(model=_model(), spec=_spec(), mode="bf16")
    assert predictor.warmup() is None
    assert not predictor.compiled_ready
    assert predictor.predict_tensors(_batch(2)).shape == (2, 3)
