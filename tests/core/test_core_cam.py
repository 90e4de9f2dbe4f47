"""Grad-CAM: source-resolution maps, per-class maps, released hooks (random weights)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from triage_core.cam import (
    CamExplainer,
    ExplanationError,
    output_shape,
    overlay_heatmap,
    to_source,
)
from triage_core.imaging import letterbox_geometry, load_image, to_tensor
from triage_core.inference import Predictor
from triage_core.models import create_model, default_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _explainer(arch: str) -> CamExplainer:
    torch.manual_seed(0)
    model = create_model(arch).eval()
    return CamExplainer(model, default_spec(arch).replace(input_size=64))


def _hook_count(model: torch.nn.Module) -> int:
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(module._backward_pre_hooks)
    return total


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(-(((yy - height * 0.6) / 15.0) ** 2 + ((xx - width * 0.3) / 12.0) ** 2))
    return np.clip(0.3 + 0.5 * blob + 0.1 * rng.random((height, width)), 0, 1).astype(np.float32)


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_heatmap_at_source_resolution_and_per_class(arch: str) -> None:
    explainer = _explainer(arch)
    image = _image(150, 97)
    maps = [explainer.explain(image, k) for k in range(3)]
    for k, result in enumerate(maps):
        assert result.heatmap.shape == image.shape
        assert result.heatmap.dtype == np.float32
        assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
        assert result.heatmap.max() == pytest.approx(1.0)  # scaled over the image
        assert result.overlay.shape == (*image.shape, 3)
        assert result.overlay.dtype == np.uint8
        assert result.class_name == explainer.spec.class_names[k]
    # a different target class gives a different map
    assert np.abs(maps[0].heatmap - maps[1].heatmap).max() > 0.05
    assert np.abs(maps[1].heatmap - maps[2].heatmap).max() > 0.05


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_no_hooks_remain_after_many_calls(arch: str) -> None:
    explainer = _explainer(arch)
    assert _hook_count(explainer.model) == 0
    image = _image(64, 80)
    for i in range(50):
        explainer.explain(image, i % 3)
        assert _hook_count(explainer.model) == 0
    # and no stale gradients are kept between calls
    assert all(p.grad is None for p in explainer.model.parameters())
    # a failing call releases them too
    with pytest.raises(ExplanationError, match="class index"):
        explainer.explain(image, 3)
    with pytest.raises(ExplanationError, match="tensor"):
        explainer.square_map(torch.zeros(3, 32, 32), 0)
    assert _hook_count(explainer.model) == 0


def test_explainer_never_touches_the_serving_model(tiny_checkpoint: Path) -> None:
    predictor = Predictor(tiny_checkpoint, mode="eager")
    before = {k: v.clone() for k, v in predictor.model.state_dict().items()}
    flags = [p.requires_grad for p in predictor.model.parameters()]
    explainer = predictor.explainer()
    assert explainer is predictor.explainer()  # built once
    explainer.explain(_image(70, 70), 1)
    assert _hook_count(predictor.model) == 0
    assert [p.requires_grad for p in predictor.model.parameters()] == flags
    after = predictor.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Grad-CAM works from inside an inference_mode block too (the worker may hold one)
    with torch.inference_mode():
        assert explainer.explain(_image(70, 70), 0).heatmap.shape == (70, 70)


def test_to_source_undoes_the_letterbox() -> None:
    height, width, size = 120, 60, 64
    box = letterbox_geometry(height, width, size)
    square = np.zeros((size, size), dtype=np.float32)
    square[:, : box.left] = 1.0  # hot padding must be cropped away
    square[box.top : box.top + box.new_h, box.left : box.left + box.new_w // 2] = 0.5
    out = to_source(square, height, width)
    assert out.shape == (height, width)
    # left half of the image hot (rescaled to 1), right half cold: the pad did not leak in
    assert out[:, : width // 2 - 2].min() == pytest.approx(1.0)
    assert out[:, width // 2 + 2 :].max() == pytest.approx(0.0)


def test_overlay_blends_only_where_hot() -> None:
    image = np.full((20, 30), 0.5, dtype=np.float32)
    heat = np.zeros_like(image)
    heat[5:10, 5:10] = 1.0
    rgb = overlay_heatmap(image, heat, alpha=0.6)
    assert rgb.shape == (20, 30, 3)
    assert (rgb[0, 0] == 128).all()  # cold: plain gray
    assert len(set(rgb[7, 7].tolist())) > 1  # hot: coloured
    with pytest.raises(ValueError, match="equal shape"):
        overlay_heatmap(image, heat[:10])
    with pytest.raises(ValueError, match="alpha"):
        overlay_heatmap(image, heat, alpha=2.0)


def test_cam_on_a_real_chest_radiograph(dicom_dir: Path, tiny_checkpoint: Path) -> None:
    predictor = Predictor(tiny_checkpoint)
    image = load_image(dicom_dir / "RG1_J2KI.dcm")
    result = predictor.explainer().explain(image, 0)
    assert result.heatmap.shape == image.shape == (1955, 1841)
    assert result.overlay.shape == (1955, 1841, 3)
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_map_from_prediction_features_equals_a_full_grad_cam_pass(arch: str) -> None:
    torch.manual_seed(0)
    spec = default_spec(arch).replace(input_size=64)
    predictor = Predictor(model=create_model(arch), spec=spec)  # channels_last fp32
    explainer = predictor.explainer()
    assert explainer.features_ok
    images = [_image(80, 70, seed=s) for s in range(3)]
    batch = torch.stack([to_tensor(image, spec) for image in images])
    probs, features = predictor.predict_with_features(batch)
    assert features is not None and features.shape[0] == 3
    np.testing.assert_array_equal(probs, predictor.predict_tensors(batch))
    for index in range(3):
        for k in range(3):
            fast = explainer.map_from_features(features[index], k)
            reference = explainer.square_map(batch[index], k)  # pytorch_grad_cam, new pass
            assert fast.shape == reference.shape == (64, 64)
            np.testing.assert_allclose(fast, reference, atol=1e-4)
    # explain() takes the same map either way
    via_features = explainer.explain(images[0], 1, features=features[0])
    via_pass = explainer.explain(images[0], 1, tensor=batch[0])
    np.testing.assert_allclose(via_features.heatmap, via_pass.heatmap, atol=1e-4)
    assert _hook_count(explainer.model) == 0 and _hook_count(predictor.model) == 0
    with pytest.raises(ExplanationError, match="class index"):
        explainer.map_from_features(features[0], 3)
    with pytest.raises(ExplanationError, match="C x h x w"):
        explainer.map_from_features(features, 0)


def test_explain_scaled_down_to_max_side() -> None:
    explainer = _explainer("efficientnet_b0")
    image = _image(300, 150)
    full = explainer.explain(image, 0)
    small = explainer.explain(image, 0, max_side=100)
    assert small.heatmap.shape == (100, 50) and small.overlay.shape == (100, 50, 3)
    assert small.heatmap.max() == pytest.approx(1.0)
    # the same map, resized once: close to the full-size map sampled at the same places
    sampled = cv2.resize(full.heatmap, (50, 100), interpolation=cv2.INTER_AREA)
    assert np.abs(sampled - small.heatmap).mean() < 0.05
    assert explainer.explain(image, 0, max_side=400).heatmap.shape == (300, 150)
    assert output_shape(300, 150, None) == (300, 150)
    assert output_shape(1024, 768, 512) == (512, 384)
