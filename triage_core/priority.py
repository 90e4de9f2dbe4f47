"""Study priority: a 0-100 score and a level from calibrated finding probabilities.

Formula
-------
For each finding class ``i`` the checkpoint's :class:`~triage_core.spec.ModelSpec` gives an
operating threshold ``t_i`` and a priority weight ``w_i >= 0``. The study's calibrated
probability ``p_i`` (the maximum over its eligible images) is first mapped to a *severity*
``s_i`` in [0, 1] that puts the threshold at exactly one half, piecewise linearly::

    s_i = 0.5 * p_i / t_i                       if p_i <  t_i
    s_i = 0.5 + 0.5 * (p_i - t_i) / (1 - t_i)   if p_i >= t_i

(with ``t_i = 0``: ``s_i = 0.5 + 0.5 * p_i``; with ``t_i = 1``: ``s_i = 0.5 * p_i``, and 1 at
``p_i = 1``). Weights are relative: ``v_i = w_i / max_j w_j`` (all weights 0 gives score 0).
The study score is the strongest weighted severity::

    score = 100 * max_i (v_i * s_i)

and the level follows from the score::

    critical  if score >= 75   (the most important class half-way from its threshold to 1)
    urgent    if score >= 50   (the most important class at or above its threshold)
    routine   otherwise

So, with the default equal weights, a study is ``urgent`` as soon as one finding is present at
its operating threshold. The score never decreases when a probability rises.

Aging
-----
So that routine studies do not wait forever behind a stream of newer ones, worklists may sort
by :func:`effective_priority`: ``score + min(max_boost, points_per_hour * hours waited)``,
at most 100 (default 10 points per hour, at most 30 points: a routine study never overtakes a
fresh critical one, but after three hours it ranks with studies 30 points above it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from triage_core.spec import PRIORITY_LEVELS, Finding, ModelSpec

logger = logging.getLogger(__name__)

#: Score at and above which a study is ``urgent``.
URGENT_SCORE = 50.0
#: Score at and above which a study is ``critical``.
CRITICAL_SCORE = 75.0


def severity(probability: float, threshold: float) -> float:
    """Map a calibrated probability to [0, 1] with the operating threshold at 0.5.

    Monotone non-decreasing in ``probability``; see the module docstring.
    """
    p = min(1.0, max(0.0, float(probability)))
    t = min(1.0, max(0.0, float(threshold)))
    if p < t:
        return 0.5 * p / t
    if t >= 1.0:
        return 1.0
    return 0.5 + 0.5 * (p - t) / (1.0 - t)


def level_for(score: float) -> str:
    """``routine``, ``urgent`` or ``critical`` for a 0-100 score."""
    if score >= CRITICAL_SCORE:
        return PRIORITY_LEVELS[2]
    if score >= URGENT_SCORE:
        return PRIORITY_LEVELS[1]
    return PRIORITY_LEVELS[0]


def score_study(findings: Sequence[Finding], spec: ModelSpec) -> tuple[float, str]:
    """Study priority from its findings.

    Parameters
    ----------
    findings : sequence of Finding
        Study-level findings (``aggregation.aggregate_study``); each ``name`` must be one of
        ``spec.class_names``. The finding's own ``threshold`` is used.
    spec : ModelSpec
        Supplies the per-class ``priority_weights``.

    Returns
    -------
    (float, str)
        Score in [0, 100] (rounded to 0.01) and its level. No findings gives
        ``(0.0, "routine")``.

    Raises
    ------
    ValueError
        A finding that is not one of the checkpoint's classes, or a non-finite probability.
    """
    weights = dict(zip(spec.class_names, spec.priority_weights, strict=True))
    top_weight = max(weights.values(), default=0.0)
    best = 0.0
    for finding in findings:
        if finding.name not in weights:
            raise ValueError(f"finding {finding.name!r} is not one of {spec.class_names}")
        if not math.isfinite(finding.probability):
            raise ValueError(f"finding {finding.name!r} has probability {finding.probability}")
        if top_weight <= 0:
            continue
        relative = weights[finding.name] / top_weight
        best = max(best, relative * severity(finding.probability, finding.threshold))
    score = round(100.0 * best, 2)
    return score, level_for(score)


@dataclass(frozen=True)
class AgingRule:
    """How a waiting study's effective priority rises.

    Parameters
    ----------
    points_per_hour : float
        Score points gained per hour of waiting (``0`` disables aging).
    max_boost : float
        Most points aging may add.
    """

    points_per_hour: float = 10.0
    max_boost: float = 30.0

    def __post_init__(self) -> None:
        for name in ("points_per_hour", "max_boost"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"AgingRule.{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"AgingRule.{name} must be finite and >= 0, got {value!r}")


def effective_priority(score: float, waited_seconds: float, rule: AgingRule | None = None) -> float:
    """Score plus the aging boost for ``waited_seconds`` of waiting, capped (see module doc).

    A negative wait (clock skew between nodes) counts as zero. The result lies in
    ``[score, min(100, score + rule.max_boost)]``.
    """
    rule = rule if rule is not None else AgingRule()
    waited = float(waited_seconds)
    if math.isnan(waited) or waited < 0:
        waited = 0.0
    boost = 0.0
    if rule.points_per_hour > 0 and waited > 0:
        boost = min(rule.max_boost, rule.points_per_hour * waited / 3600.0)
    return min(100.0, max(float(score), float(score) + boost))
