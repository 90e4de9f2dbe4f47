"""Static int8 on the CPU (PyTorch FX graph mode, x86 backend) for ``benchmarks/bench_core.py``.

timm's ``tf_`` EfficientNets (Lite0, B0) cannot be traced by FX as they are: their TensorFlow
"same" padding (``Conv2dSame``) computes the padding from the input shape at run time, and their
``BatchNormAct2d`` layers are not the Conv-BN pattern FX fuses. For a fixed input size both are
rewritten first, without changing the function (checked: logits within 1e-4):

* every ``Conv2dSame`` becomes ``ZeroPad2d`` (the padding it computes at that size) + ``Conv2d``;
* every ``BatchNormAct2d`` is folded into the convolution before it and replaced by its
  activation (ReLU6 in Lite0).

Then ``prepare_fx`` with the x86 default qconfig, calibration on real images (not the measured
ones), ``convert_fx``. PyTorch's newer PT2E flow lives in ``torchao``, which is not a dependency.
"""

from __future__ import annotations

import copy
from typing import Any


def static_same_padding(model: Any, size: int) -> Any:
    """Replace timm ``Conv2dSame`` modules by fixed padding + ``Conv2d`` for ``size`` inputs."""
    import torch
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding
    from torch import nn

    shapes: dict[str, Any] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, inputs, name=name: shapes.__setitem__(name, inputs[0].shape[-2:])
        )
        for name, module in model.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    for name, (height, width) in shapes.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        conv = getattr(parent, leaf)
        ph = get_same_padding(height, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pw = get_same_padding(width, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        plain = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            0,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
        )
        plain.load_state_dict(conv.state_dict())
        pad = nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        setattr(parent, leaf, nn.Sequential(pad, plain))
    return model


def fold_batchnorm_act(model: Any) -> Any:
    """Fold each timm ``BatchNormAct2d`` into the convolution just before it (same parent)."""
    import torch
    from timm.layers.norm_act import BatchNormAct2d
    from torch import nn

    for module in list(model.modules()):
        last: nn.Conv2d | None = None
        for name, child in list(module.named_children()):
            conv = child
            if isinstance(child, nn.Sequential) and len(child) and isinstance(child[-1], nn.Conv2d):
                conv = child[-1]
            if isinstance(conv, nn.Conv2d):
                last = conv
            elif isinstance(child, BatchNormAct2d) and last is not None:
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                with torch.no_grad():
                    last.weight.mul_(scale.view(-1, 1, 1, 1))
                    bias = last.bias if last.bias is not None else torch.zeros_like(scale)
                    last.bias = nn.Parameter(child.bias + (bias - child.running_mean) * scale)
                setattr(module, name, child.act)
                last = None
    return model


def quantize_static(model: Any, size: int, calibration: Any) -> Any:
    """An int8 copy of ``model`` (eval mode) for ``size`` px inputs, calibrated on
    ``calibration`` (``(N, 3, S, S)`` tensors)."""
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx

    prepared_model = fold_batchnorm_act(static_same_padding(copy.deepcopy(model).eval(), size))
    example = (calibration[:1],)
    prepared = quantize_fx.prepare_fx(prepared_model, get_default_qconfig_mapping("x86"), example)
    with torch.inference_mode():
        for start in range(0, calibration.shape[0], 16):
            prepared(calibration[start : start + 16])
    return quantize_fx.convert_fx(prepared)


def adoption_check(
    model: Any, spec: Any, quantized: Any, tensors: Any, targets: Any
) -> dict[str, Any]:
    """Per-class AUROC of fp32 and int8 on ``tensors`` (a held-out split) and the share of
    present/absent decisions that flip; the issue's rule: adopt only if every class's AUROC
    moves by at most 0.01 and at most 1 % of decisions flip."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from triage_core.inference import calibrate

    with torch.inference_mode():
        fp32 = calibrate(
            torch.cat([model(tensors[i : i + 16]) for i in range(0, len(tensors), 16)]), spec
        )
        int8 = calibrate(
            torch.cat([quantized(tensors[i : i + 16]) for i in range(0, len(tensors), 16)]), spec
        )
    thresholds = np.asarray(spec.thresholds, dtype=np.float32)
    flips = int(((fp32 >= thresholds) != (int8 >= thresholds)).sum())
    decisions = int(fp32.size)
    per_class = {}
    for j, name in enumerate(spec.class_names):
        y = np.asarray(targets)[:, j]
        if 0 < y.sum() < len(y):
            a, b = roc_auc_score(y, fp32[:, j]), roc_auc_score(y, int8[:, j])
            per_class[name] = {
                "auroc_fp32": float(a),
                "auroc_int8": float(b),
                "delta": float(b - a),
            }
    worst = max((abs(v["delta"]) for v in per_class.values()), default=float("nan"))
    return {
        "images": int(len(tensors)),
        "per_class": per_class,
        "max_abs_auroc_delta": worst,
        "flips": flips,
        "decisions": decisions,
        "flip_rate": flips / decisions if decisions else float("nan"),
        "max_abs_dprob": float(np.abs(fp32 - int8).max()),
        "adopt": bool(worst <= 0.01 and flips <= 0.01 * decisions),
    }
