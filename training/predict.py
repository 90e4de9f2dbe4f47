"""Logits of a model on cached tensors, plain and with horizontal-flip test-time augmentation,
and the linear-probe start of the classifier (the "LP" of LP-FT)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from training.recipe import TrainingError

if TYPE_CHECKING:
    import torch


def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    channels_last: bool = False,
    amp: bool = False,
) -> np.ndarray:
    """Logits ``(N, C)`` for cached tensors, in eval mode, batched, without gradients."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].to(device, torch.float32)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            outs.append(out.float().cpu())
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outs).numpy()


def flip_tta_logits(model: torch.nn.Module, images: torch.Tensor, **kwargs: Any) -> np.ndarray:
    """Mean of the logits of the images and of their horizontal mirror images."""
    plain = predict_logits(model, images, channels_last=True, **kwargs)
    mirrored = predict_logits(model, images.flip(-1), channels_last=True, **kwargs)
    return (plain + mirrored) / 2


def classifier_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The final linear layer (timm ``get_classifier()``, torchvision ResNet ``fc``)."""
    import torch

    core = getattr(model, "module", model)
    getter = getattr(core, "get_classifier", None)
    layer = getter() if callable(getter) else getattr(core, "fc", None)
    if not isinstance(layer, torch.nn.Linear):
        raise TrainingError(f"no linear classifier found in {type(core).__name__}")
    return layer


def probe_head(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: np.ndarray,
    task: str,
    *,
    c: float = 0.1,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Start the classifier from a linear probe (the "LP" of LP-FT, Kumar et al. 2022).

    The pooled features of the (unaugmented) training images are computed once with the
    pretrained backbone in eval mode; an L2-regularised, class-balanced logistic regression
    (scikit-learn, deterministic lbfgs) is fitted per class (multilabel) or jointly
    (multiclass), and its weights become the classifier's. Fine-tuning then starts from a head
    that already fits the features, so the first large gradients of a random head do not wreck
    the pretrained features. Returns the probe's training-set mean AUROC.
    """
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    layer = classifier_layer(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        predict_logits(model, images, batch_size=batch_size, channels_last=True)
    finally:
        handle.remove()
    features = torch.cat(captured).float().numpy()
    weight = np.zeros(tuple(layer.weight.shape), dtype=np.float64)
    bias = np.zeros(layer.weight.shape[0], dtype=np.float64)
    if task == "multiclass":
        clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
        clf.fit(features, targets)
        weight[:], bias[:] = clf.coef_, clf.intercept_
        scores = clf.decision_function(features)
        y = np.eye(weight.shape[0])[np.asarray(targets, dtype=np.int64)]
    else:
        y = np.asarray(targets)
        scores = np.zeros_like(y, dtype=np.float64)
        for k in range(y.shape[1]):
            if not 0 < y[:, k].sum() < len(y):
                continue
            clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
            clf.fit(features, y[:, k])
            weight[k], bias[k] = clf.coef_[0], clf.intercept_[0]
            scores[:, k] = clf.decision_function(features)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight).to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(bias).to(layer.bias))
    aucs = [
        roc_auc_score(y[:, k], scores[:, k])
        for k in range(y.shape[1])
        if 0 < y[:, k].sum() < len(y)
    ]
    return {"c": c, "train_mean_auroc": float(np.mean(aucs)) if aucs else None}


__all__ = ["classifier_layer", "flip_tta_logits", "predict_logits", "probe_head"]
