"""Calibrated probabilities from a model's raw logits (temperature scaling).

The temperature is fitted once, on held-out logits, by :mod:`training.calibrate` and stored in
the checkpoint's :class:`~triage_core.spec.ModelSpec`; :func:`calibrate` applies it. Both runtimes
of :class:`~triage_core.inference.Predictor` return raw logits and share this one function, so a
probability means the same whichever runtime computed it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from triage_core.spec import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = ["calibrate"]


def calibrate(logits: np.ndarray | torch.Tensor, spec: ModelSpec) -> np.ndarray:
    """Calibrated probabilities from raw logits: ``softmax`` or ``sigmoid`` of ``logits / T``.

    Parameters
    ----------
    logits : array or tensor, shape (N, C)
        Raw model outputs.
    spec : ModelSpec
        Supplies ``temperature`` and ``task`` (``multiclass``: a softmax over classes;
        ``multilabel``: one sigmoid per class).

    Returns
    -------
    numpy.ndarray
        ``(N, C)`` float32 probabilities.

    Raises
    ------
    ValueError
        ``logits`` is not ``(N, spec.num_classes)``.
    """
    if not isinstance(logits, np.ndarray):  # a torch tensor
        logits = logits.detach().to("cpu").float().numpy()
    values = np.asarray(logits, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] != spec.num_classes:
        raise ValueError(
            f"expected logits of shape (N, {spec.num_classes}), got {tuple(values.shape)}"
        )
    scaled = values / np.float32(spec.temperature)
    if spec.task == "multiclass":
        shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
    else:
        probs = np.where(
            scaled >= 0,
            1.0 / (1.0 + np.exp(-np.abs(scaled))),
            np.exp(-np.abs(scaled)) / (1.0 + np.exp(-np.abs(scaled))),
        )
    out: np.ndarray = np.asarray(probs, dtype=np.float32)
    return out
