"""Priority score and level: monotone, threshold at 50, weights, capped aging."""

from __future__ import annotations

import itertools
import math

import pytest

from triage_core.priority import (
    CRITICAL_SCORE,
    URGENT_SCORE,
    AgingRule,
    effective_priority,
    level_for,
    score_study,
    severity,
)
from triage_core.spec import Finding, ModelSpec

SPEC = ModelSpec(arch="resnet18", thresholds=(0.4, 0.5, 0.6), priority_weights=(1.0, 2.0, 0.5))


def _findings(probs: tuple[float, float, float], spec: ModelSpec = SPEC) -> list[Finding]:
    return [
        Finding(name, p, t, p >= t, "1.2.3")
        for name, p, t in zip(spec.class_names, probs, spec.thresholds, strict=True)
    ]


def test_score_is_monotone_in_each_probability() -> None:
    grid = [i / 10 for i in range(11)]
    for k in range(3):
        for others in itertools.product([0.0, 0.35, 0.8], repeat=2):
            scores = []
            for p in grid:
                probs = list(others)
                probs.insert(k, p)
                scores.append(score_study(_findings(tuple(probs)), SPEC)[0])  # type: ignore[arg-type]
            assert scores == sorted(scores), (k, others, scores)
            assert all(0.0 <= s <= 100.0 for s in scores)


def test_threshold_maps_to_urgent_and_one_to_critical() -> None:
    spec = ModelSpec(arch="resnet18", thresholds=(0.3, 0.5, 0.7))
    for k, threshold in enumerate(spec.thresholds):
        probs = [0.0, 0.0, 0.0]
        probs[k] = threshold
        score, level = score_study(_findings(tuple(probs), spec), spec)  # type: ignore[arg-type]
        assert score == pytest.approx(URGENT_SCORE)
        assert level == "urgent"
        probs[k] = threshold - 0.01
        assert score_study(_findings(tuple(probs), spec), spec)[1] == "routine"  # type: ignore[arg-type]
        probs[k] = 1.0
        assert score_study(_findings(tuple(probs), spec), spec) == (100.0, "critical")  # type: ignore[arg-type]


def test_weights_are_relative() -> None:
    # Effusion has the top weight (2.0); Infiltration's weight is a quarter of it
    assert score_study(_findings((0.0, 1.0, 0.0)), SPEC)[0] == pytest.approx(100.0)
    assert score_study(_findings((0.0, 0.0, 1.0)), SPEC)[0] == pytest.approx(25.0)
    assert score_study(_findings((1.0, 0.0, 0.0)), SPEC)[0] == pytest.approx(50.0)
    zero = SPEC.replace(priority_weights=[0.0, 0.0, 0.0])
    assert score_study(_findings((1.0, 1.0, 1.0), zero), zero) == (0.0, "routine")


def test_no_findings_and_bad_findings() -> None:
    assert score_study([], SPEC) == (0.0, "routine")
    with pytest.raises(ValueError, match="Pneumothorax"):
        score_study([Finding("Pneumothorax", 0.9, 0.5, True)], SPEC)
    with pytest.raises(ValueError, match="nan"):
        score_study([Finding("Effusion", math.nan, 0.5, False)], SPEC)


def test_severity_edges_and_levels() -> None:
    assert severity(0.0, 0.0) == pytest.approx(0.5)
    assert severity(1.0, 0.0) == pytest.approx(1.0)
    assert severity(0.99, 1.0) < 0.5
    assert severity(1.0, 1.0) == pytest.approx(1.0)
    assert level_for(CRITICAL_SCORE) == "critical"
    assert level_for(CRITICAL_SCORE - 0.01) == "urgent"
    assert level_for(URGENT_SCORE - 0.01) == "routine"


def test_aging_rises_then_caps() -> None:
    rule = AgingRule(points_per_hour=10.0, max_boost=30.0)
    waits = [0, 600, 3600, 7200, 3 * 3600, 5 * 3600, 48 * 3600]
    values = [effective_priority(20.0, w, rule) for w in waits]
    assert values == sorted(values)
    assert values[0] == 20.0
    assert values[2] == pytest.approx(30.0)
    assert values[-1] == pytest.approx(50.0)  # capped at score + max_boost
    assert values[-2] == values[-1]
    assert effective_priority(90.0, 10 * 3600, rule) == 100.0  # never above 100
    assert effective_priority(20.0, -500, rule) == 20.0  # clock skew counts as no wait
    assert effective_priority(20.0, math.inf, rule) == pytest.approx(50.0)
    assert effective_priority(20.0, 3600, AgingRule(points_per_hour=0)) == 20.0
    # a routine study never overtakes a fresh critical one with the default rule
    assert effective_priority(10.0, 1e9) < CRITICAL_SCORE


def test_aging_rule_validation() -> None:
    with pytest.raises(ValueError, match="max_boost"):
        AgingRule(max_boost=-1)
    with pytest.raises(ValueError, match="points_per_hour"):
        AgingRule(points_per_hour=math.nan)
