"""Operating points with margin (issue 23, item 4): thresholds fitted so that the out-of-fold
urgent share is <= 1.3 x the share with any finding, the ratio's patient-bootstrap interval, and
the per-class sensitivity / specificity / PPV table."""

from __future__ import annotations

import numpy as np
import pytest

from training import oof
from training.recipe import TrainingError

NAMES = ("Atelectasis", "Effusion", "Infiltration")


def _synthetic_oof(seed: int = 7) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """600 images of 300 patients (two each, the same labels), 12-15 % prevalence, weak
    scores: the Youden points flag about twice the studies that have a finding."""
    rng = np.random.default_rng(seed)
    y_patient = (rng.random((300, 3)) < np.asarray([0.12, 0.14, 0.15])).astype(float)
    y = np.repeat(y_patient, 2, axis=0)
    probs = np.clip(0.4 + 0.12 * y + rng.normal(0, 0.12, y.shape), 0, 1)
    return probs, y, [f"p{i // 2}" for i in range(len(y))]


def _urgent(probs: np.ndarray, thresholds: list[float]) -> float:
    return float((probs >= np.asarray(thresholds)).any(axis=1).mean())


def test_the_urgent_bound_binds_and_holds() -> None:
    probs, y, patients = _synthetic_oof()
    any_share = float(y.any(axis=1).mean())
    youden = [oof.youden_threshold(y[:, k], probs[:, k]) for k in range(3)]
    assert _urgent(probs, youden) > 1.3 * any_share  # the bound binds here
    assert oof.URGENT_BOUND == 1.3
    thresholds, rule = oof.choose_operating_thresholds(probs, y)  # the default: 1.3
    urgent = _urgent(probs, thresholds)
    assert urgent <= 1.3 * any_share + 1e-12
    assert urgent >= 1.25 * any_share  # raised only as far as the bound needs
    assert all(t >= u for t, u in zip(thresholds, youden, strict=True))
    assert "<= 1.3 x the share with any finding" in rule
    # a looser bound gives lower thresholds and a longer urgent list
    loose, _ = oof.choose_operating_thresholds(probs, y, 1.5)
    assert all(a <= b for a, b in zip(loose, thresholds, strict=True))
    assert 1.3 * any_share < _urgent(probs, loose) <= 1.5 * any_share + 1e-12
    with pytest.raises(TrainingError, match="--urgent-bound must be positive"):
        oof.choose_operating_thresholds(probs, y, 0.0)


def test_operating_points_report_the_ratio_with_a_patient_interval() -> None:
    probs, y, patients = _synthetic_oof()
    thresholds, _ = oof.choose_operating_thresholds(probs, y)
    points = oof.operating_points(probs, y, patients, NAMES, thresholds)
    urgent = (probs >= np.asarray(thresholds)).any(axis=1)
    truly = y.any(axis=1)
    ratio, low, high = points["urgent_ratio"]
    assert ratio == pytest.approx(urgent.mean() / truly.mean(), abs=1e-4)
    assert ratio <= 1.3 and low < ratio < high and high - low > 0.02
    assert points["urgent_bound_factor"] == 1.3
    assert points["urgent_bound"] == pytest.approx(1.3 * truly.mean(), abs=1e-4)
    # patients, not images, are resampled: doubling every patient's images changes nothing
    doubled = oof.operating_points(
        np.repeat(probs, 2, axis=0), np.repeat(y, 2, axis=0), np.repeat(patients, 2), NAMES,
        thresholds,
    )  # fmt: skip
    assert doubled["urgent_ratio"] == points["urgent_ratio"]
    # the per-class table is kept: sensitivity, specificity and PPV at each threshold
    for k, name in enumerate(NAMES):
        called, pos = probs[:, k] >= thresholds[k], y[:, k] > 0.5
        row = points[name]
        assert row["threshold"] == pytest.approx(thresholds[k], abs=1e-6)
        assert row["sensitivity"][0] == pytest.approx(called[pos].mean(), abs=1e-4)
        assert row["specificity"][0] == pytest.approx(1 - called[~pos].mean(), abs=1e-4)
        assert row["ppv"][0] == pytest.approx(pos[called].mean(), abs=1e-4)
        for metric in ("sensitivity", "specificity", "ppv"):
            point, lo, hi = row[metric]
            assert lo <= point <= hi


def test_the_card_states_the_ratio_only_where_the_spec_has_it() -> None:
    from training.model_card import _urgent_ratio

    assert _urgent_ratio({"urgent_share": 0.5}) == ""  # older specs: the card is unchanged
    text = _urgent_ratio({"urgent_ratio": [1.28, 1.2, 1.36], "urgent_bound_factor": 1.3})
    assert "1.280 [1.200, 1.360]" in text and "<= 1.3" in text
