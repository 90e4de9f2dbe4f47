"""Calibration on the validation split: temperature scaling and per-class operating thresholds.

* **Temperature** (Guo et al. 2017): one scalar ``T > 0`` dividing every logit, fitted by
  minimising the validation negative log-likelihood (softmax cross-entropy for ``multiclass``,
  mean binary cross-entropy over classes for ``multilabel``). It changes confidence, never the
  ranking, so AUROC is unchanged.
* **Thresholds** (documented rule, default ``sensitivity >= 0.9``): for each class, the highest
  threshold on the calibrated probability at which at least 90 % of the validation positives of
  that class are called present. A class without validation positives keeps 0.5 and the summary
  says so. ``present = probability >= threshold`` (``triage_core.spec.Finding``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from triage_core.errors import TriageError

logger = logging.getLogger(__name__)

#: The default operating-point rule.
DEFAULT_SENSITIVITY = 0.9


class CalibrationError(TriageError):
    """Calibration inputs are unusable (empty, wrong shape, non-finite)."""


def probabilities(logits: np.ndarray, task: str, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probabilities from logits: softmax (multiclass) or sigmoid (multilabel)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if task == "multiclass":
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def _nll(logits: Any, targets: Any, task: str) -> Any:
    import torch.nn.functional as F

    if task == "multiclass":
        return F.cross_entropy(logits, targets.long())
    return F.binary_cross_entropy_with_logits(logits, targets.float())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, task: str) -> float:
    """Fit the temperature minimising validation NLL (L-BFGS over ``log T``).

    Parameters
    ----------
    logits : numpy.ndarray
        ``(N, C)`` uncalibrated logits on the validation split.
    targets : numpy.ndarray
        ``(N,)`` class indices (multiclass) or ``(N, C)`` 0/1 (multilabel).
    task : str
        ``multiclass`` or ``multilabel``.

    Returns
    -------
    float
        ``T`` in [0.05, 20]; 1.0 if the fit does not improve the NLL.
    """
    import torch

    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or len(logits) == 0:
        raise CalibrationError(f"expected (N, C) logits with N > 0, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise CalibrationError("validation logits contain NaN or infinity")
    z = torch.from_numpy(logits).double()
    y = torch.from_numpy(np.asarray(targets)).double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Any:
        optimizer.zero_grad()
        loss = _nll(z / log_t.exp(), y, task)
        loss.backward()
        return loss

    with torch.enable_grad():
        before = float(_nll(z, y, task))
        optimizer.step(closure)
    temperature = float(np.clip(math.exp(float(log_t.detach())), 0.05, 20.0))
    with torch.no_grad():
        after = float(_nll(z / temperature, y, task))
    if not math.isfinite(after) or after > before:
        logger.info(
            "temperature fit did not improve NLL (%.4f -> %.4f); keeping 1.0", before, after
        )
        return 1.0
    logger.info("temperature %.3f: validation NLL %.4f -> %.4f", temperature, before, after)
    return temperature


def fit_temperature_and_shift(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Multilabel calibration: one temperature ``T`` and a logit shift ``d_c`` per class,
    minimising the NLL of ``sigmoid((z + d) / T)`` (L-BFGS over ``log T`` and ``d``).

    Why the shift: a loss with ``pos_weight`` (or a class-balanced probe) trains logits that
    put the decision near a balanced 50 %, while a finding's prevalence is 10-20 %; a
    temperature alone cannot move the base rate. The shipped model folds ``d`` into its
    classifier bias, so serving applies only ``T`` (``ModelSpec.temperature``).

    Returns
    -------
    tuple
        ``T`` in [0.05, 20] and the ``(C,)`` shifts.
    """
    import torch

    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or len(z) == 0 or not np.isfinite(z).all():
        raise CalibrationError(f"expected finite (N, C) logits with N > 0, got shape {z.shape}")
    zt = torch.from_numpy(z)
    y = torch.from_numpy(np.asarray(targets, dtype=np.float64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    shift = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t, shift], lr=0.1, max_iter=500, line_search_fn="strong_wolfe"
    )

    def closure() -> Any:
        optimizer.zero_grad()
        loss = _nll((zt + shift) / log_t.exp(), y, "multilabel")
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    temperature = float(np.clip(math.exp(float(log_t.detach())), 0.05, 20.0))
    return temperature, shift.detach().numpy().copy()


def choose_thresholds(
    probs: np.ndarray,
    multi_hot: np.ndarray,
    class_names: Sequence[str],
    sensitivity: float = DEFAULT_SENSITIVITY,
) -> tuple[tuple[float, ...], dict[str, Any]]:
    """Per-class thresholds by the rule "highest threshold with sensitivity >= ``sensitivity``".

    Returns the thresholds and a summary per class (rule, positives, sensitivity and
    specificity reached on the validation split).
    """
    if not 0 < sensitivity <= 1:
        raise CalibrationError(f"sensitivity must be in (0, 1], got {sensitivity}")
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(multi_hot) > 0.5
    thresholds: list[float] = []
    summary: dict[str, Any] = {
        "rule": f"highest threshold with validation sensitivity >= {sensitivity:g}"
    }
    for c, name in enumerate(class_names):
        pos = np.sort(probs[y[:, c], c])[::-1]
        if len(pos) == 0:
            thresholds.append(0.5)
            summary[name] = {"positives": 0, "note": "no validation positives: kept 0.5"}
            continue
        k = max(1, math.ceil(sensitivity * len(pos)))
        t = float(np.clip(pos[k - 1], 0.0, 1.0))
        thresholds.append(t)
        called = probs[:, c] >= t
        negatives = int((~y[:, c]).sum())
        summary[name] = {
            "threshold": round(t, 6),
            "positives": int(len(pos)),
            "sensitivity": float(called[y[:, c]].mean()),
            "specificity": float((~called[~y[:, c]]).mean()) if negatives else None,
        }
    return tuple(thresholds), summary


def expected_calibration_error(
    probs: np.ndarray, targets: np.ndarray, task: str, bins: int = 10
) -> float:
    """ECE with equal-width bins.

    Multiclass: confidence of the arg-max class against its correctness. Multilabel: every
    (image, class) probability against its 0/1 label, pooled.
    """
    conf, correct = reliability_pairs(probs, targets, task)
    if len(conf) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(float(correct[mask].mean()) - float(conf[mask].mean()))
    return float(ece)


def reliability_pairs(
    probs: np.ndarray, targets: np.ndarray, task: str
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs used by ECE and the reliability diagram."""
    probs = np.asarray(probs, dtype=np.float64)
    if task == "multiclass":
        pred = probs.argmax(axis=1)
        return probs.max(axis=1), (pred == np.asarray(targets)).astype(np.float64)
    return probs.ravel(), (np.asarray(targets) > 0.5).astype(np.float64).ravel()
