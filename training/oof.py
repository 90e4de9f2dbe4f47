"""Out-of-fold (OOF) predictions: collecting them, judging them, and what is fitted on them.

Everything here works on pooled OOF predictions of :mod:`training.cv` (every image predicted
once by the fold model that did not see its patient):

* :func:`patient_bootstrap` - AUROC per class and their mean with 95 % percentile intervals
  that resample *patients* (all of a patient's images together), not images;
* :func:`score_variants` - the table of a run's variants (final weights, EMA, flip TTA,
  per-epoch snapshots); ensembles of runs on the same folds are in :mod:`training.ensemble`;
* :func:`operating_points` - per-class thresholds for a stated target, with sensitivity,
  specificity and PPV (patient-bootstrap intervals), the urgent share they produce, and
* :func:`drift_reference` - the 20-bin reference histograms the node's drift panel compares
  live scores with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from training.recipe import TrainingError

#: Bins of the drift reference histograms (equal width on [0, 1]).
DRIFT_BINS = 20
#: Bootstrap resamples for every interval.
N_BOOT = 1000
#: The thresholds keep the OOF urgent share (any finding flagged) at or below this many times the
#: share of studies that have any of the findings (``triage train --final-from --urgent-bound``).
URGENT_BOUND = 1.3


def _patient_index(patients: Sequence[str]) -> list[np.ndarray]:
    """Image indices of each patient (in first-seen order)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(str(p), []).append(i)
    return [np.asarray(v, dtype=np.int64) for v in groups.values()]


def auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of 0/1 labels ``y`` (both present) for ``scores``: the Mann-Whitney statistic
    with tied scores counted one half, the value ``sklearn.metrics.roc_auc_score`` gives,
    without its input validation (the bootstrap calls it thousands of times)."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    ranks = rankdata(scores)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def patient_bootstrap(
    y: np.ndarray,
    scores: np.ndarray,
    patients: Sequence[str],
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-class AUROC and mean AUROC with 95 % intervals from a patient bootstrap.

    Parameters
    ----------
    y, scores : numpy.ndarray
        ``(N, C)`` 0/1 labels and scores (logits or probabilities: AUROC is rank-based).
    patients : sequence of str
        Patient of each row; a resample draws patients with replacement and takes all their
        images.

    Returns
    -------
    dict
        ``{"per_class": [[auc, low, high], ...], "mean": [auc, low, high]}``.
    """
    y = np.asarray(y) > 0.5
    scores = np.asarray(scores, dtype=np.float64)
    groups = _patient_index(patients)
    rng = np.random.default_rng(seed)
    c = y.shape[1]
    point = [auroc(y[:, k], scores[:, k]) for k in range(c)]
    samples: list[list[float]] = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(groups), len(groups))
        idx = np.concatenate([groups[i] for i in pick])
        yb, sb = y[idx], scores[idx]
        if any(yb[:, k].all() or not yb[:, k].any() for k in range(c)):
            continue
        samples.append([auroc(yb[:, k], sb[:, k]) for k in range(c)])
    arr = np.asarray(samples)
    lows = np.percentile(arr, 2.5, axis=0)
    highs = np.percentile(arr, 97.5, axis=0)
    means = arr.mean(axis=1)
    return {
        "per_class": [
            [round(point[k], 4), round(float(lows[k]), 4), round(float(highs[k]), 4)]
            for k in range(c)
        ],
        "mean": [
            round(float(np.mean(point)), 4),
            round(float(np.percentile(means, 2.5)), 4),
            round(float(np.percentile(means, 97.5)), 4),
        ],
        "resamples": len(samples),
    }


# --------------------------------------------------------------------------------------------
# scoring pooled predictions


def score_variants(
    task: str,
    y: np.ndarray,
    patients: Sequence[str],
    pooled: Mapping[str, np.ndarray],
) -> dict[str, dict[str, Any]]:
    """Every complete variant's patient-bootstrap AUROC table (one-vs-rest for multiclass,
    ``y`` one-hot); multiclass variants also carry the arg-max ``accuracy`` and ``macro_f1``
    (the seed study's figures)."""
    from sklearn.metrics import accuracy_score, f1_score

    out: dict[str, dict[str, Any]] = {}
    for name, logits in sorted(pooled.items()):
        if np.isnan(logits).any():
            continue
        row = patient_bootstrap(y, logits, patients)
        if task == "multiclass":
            truth, guess = np.asarray(y).argmax(axis=1), logits.argmax(axis=1)
            labels = list(range(logits.shape[1]))
            row["accuracy"] = round(float(accuracy_score(truth, guess)), 4)
            row["macro_f1"] = round(
                float(f1_score(truth, guess, average="macro", labels=labels, zero_division=0)), 4
            )
        out[name] = row
    return out


# --------------------------------------------------------------------------------------------
# tables


def format_table(
    variants: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str] = ("Atelectasis", "Effusion", "Infiltration"),
    title: str = "",
) -> str:
    """A Markdown table: one row per variant, per-class and mean OOF AUROC with intervals."""

    def cell(v: Sequence[float]) -> str:
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    lines = [f"OOF AUROC (95 % patient bootstrap) {title}".rstrip(), ""]
    lines.append("| variant | " + " | ".join(class_names) + " | mean |")
    lines.append("|---" * (len(class_names) + 2) + "|")
    for name, row in variants.items():
        cells = [cell(v) for v in row["per_class"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {cell(row['mean'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# operating points and drift reference


def _rates(y: np.ndarray, called: np.ndarray) -> tuple[float, float, float]:
    tp = float((called & y).sum())
    fp = float((called & ~y).sum())
    pos, neg = float(y.sum()), float((~y).sum())
    sens = tp / pos if pos else math.nan
    spec = 1 - fp / neg if neg else math.nan
    ppv = tp / (tp + fp) if tp + fp else math.nan
    return sens, spec, ppv


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold maximising sensitivity + specificity - 1 (the Youden point);
    ties go to the higher threshold (fewer studies flagged)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(np.asarray(y) > 0.5, p)
    j = tpr - fpr
    best = np.flatnonzero(j == j.max())
    t = float(thr[best[0]])  # roc_curve lists thresholds in decreasing order
    return float(min(1.0, t))


def operating_points(
    probs: np.ndarray,
    y: np.ndarray,
    patients: Sequence[str],
    class_names: Sequence[str],
    thresholds: Sequence[float],
    n_boot: int = N_BOOT,
    seed: int = 0,
    bound_factor: float = URGENT_BOUND,
) -> dict[str, Any]:
    """Sensitivity, specificity and PPV at ``thresholds`` with patient-bootstrap intervals,
    flagged share per class, and the urgent share (any finding flagged) beside the share that
    truly has at least one of the findings: their ratio (``urgent_ratio``, with its
    patient-bootstrap interval) and the bound ``bound_factor`` x that share."""
    y = np.asarray(y) > 0.5
    probs = np.asarray(probs, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64)
    called = probs >= t
    urgent: np.ndarray = np.asarray(called.any(axis=1))
    truly: np.ndarray = np.asarray(y.any(axis=1))
    groups = _patient_index(patients)
    rng = np.random.default_rng(seed)
    boots: list[list[tuple[float, float, float]]] = []
    ratios: list[float] = []
    for _ in range(n_boot):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        boots.append([_rates(y[idx, k], called[idx, k]) for k in range(len(class_names))])
        if truly[idx].any():
            ratios.append(float(urgent[idx].mean() / truly[idx].mean()))
    arr = np.asarray(boots, dtype=np.float64)  # (B, C, 3)
    out: dict[str, Any] = {}
    for k, name in enumerate(class_names):
        point = _rates(y[:, k], called[:, k])
        entry: dict[str, Any] = {
            "threshold": round(float(t[k]), 6),
            "positives": int(y[:, k].sum()),
            "flagged_share": round(float(called[:, k].mean()), 4),
            "prevalence": round(float(y[:, k].mean()), 4),
        }
        for j, metric in enumerate(("sensitivity", "specificity", "ppv")):
            col = arr[:, k, j]
            col = col[np.isfinite(col)]
            entry[metric] = [
                round(point[j], 4),
                round(float(np.percentile(col, 2.5)), 4),
                round(float(np.percentile(col, 97.5)), 4),
            ]
        out[name] = entry
    out["urgent_share"] = round(float(urgent.mean()), 4)
    out["any_finding_share"] = round(float(truly.mean()), 4)
    out["urgent_bound"] = round(bound_factor * float(truly.mean()), 4)
    out["urgent_bound_factor"] = bound_factor
    ratio = float(urgent.mean() / truly.mean()) if truly.any() else math.nan
    out["urgent_ratio"] = [
        round(ratio, 4),
        round(float(np.percentile(ratios, 2.5)), 4) if ratios else math.nan,
        round(float(np.percentile(ratios, 97.5)), 4) if ratios else math.nan,
    ]
    out["urgent_sensitivity"] = round(float(urgent[truly].mean()), 4)
    out["urgent_ppv"] = round(float(truly[urgent].mean()) if urgent.any() else math.nan, 4)
    out["images"] = len(y)
    return out


def choose_operating_thresholds(
    probs: np.ndarray, y: np.ndarray, bound_factor: float = URGENT_BOUND
) -> tuple[list[float], str]:
    """Per-class Youden thresholds; if together they call more studies urgent than
    ``bound_factor`` times the share that has any finding, every class's threshold is raised to
    the same higher quantile of its own scores until the urgent share fits the bound.

    Returns the thresholds and the rule in words (for the spec and card).

    Raises
    ------
    TrainingError
        ``bound_factor`` not positive, or no thresholds meet the bound.
    """
    if not bound_factor > 0:
        raise TrainingError(f"--urgent-bound must be positive, got {bound_factor}")
    y = np.asarray(y) > 0.5
    probs = np.asarray(probs, dtype=np.float64)
    c = probs.shape[1]
    thresholds = [youden_threshold(y[:, k], probs[:, k]) for k in range(c)]
    rule = "Youden point per class (maximum sensitivity + specificity - 1) on the OOF predictions"
    bound = bound_factor * float(y.any(axis=1).mean())
    if float((probs >= np.asarray(thresholds)).any(axis=1).mean()) <= bound:
        return thresholds, rule
    flagged = [float((probs[:, k] >= thresholds[k]).mean()) for k in range(c)]
    for shrink in np.linspace(1.0, 0.0, 201)[1:]:
        raised = [
            max(thresholds[k], float(np.quantile(probs[:, k], 1 - flagged[k] * shrink)))
            for k in range(c)
        ]
        if float((probs >= np.asarray(raised)).any(axis=1).mean()) <= bound:
            return raised, (
                rule + f", each class's flagged share then scaled by {shrink:.3f} so that the "
                f"urgent share stays <= {bound_factor:g} x the share with any finding"
            )
    raise TrainingError("no thresholds keep the urgent share under its bound")


def drift_reference(
    probs: np.ndarray, thresholds: Sequence[float], class_names: Sequence[str]
) -> dict[str, Any]:
    """Per class: the 20-bin histogram (equal width on [0, 1], shares summing to 1) of the OOF
    calibrated probabilities and the reference flagged ("positive") share at the threshold."""
    probs = np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, DRIFT_BINS + 1)
    out: dict[str, Any] = {"bins": DRIFT_BINS, "images": len(probs), "classes": {}}
    for k, name in enumerate(class_names):
        counts, _ = np.histogram(np.clip(probs[:, k], 0.0, 1.0), bins=edges)
        out["classes"][name] = {
            "histogram": [round(float(v), 6) for v in counts / max(1, counts.sum())],
            "positive_share": round(float((probs[:, k] >= thresholds[k]).mean()), 6),
        }
    return out
