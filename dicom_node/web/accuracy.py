"""Live accuracy from readers' verdicts, beside the model card's figures (operations page,
``/metrics``).

Over the studies whose finding has a decided final verdict
(:meth:`triage_core.worklist.feedback.Feedback.labelled`), per model version and finding:

- sensitivity, specificity and PPV at the operating threshold (the ``present`` flag the study's
  result recorded), each with its count and a 95 % Wilson score interval (:func:`wilson`);
- AUROC of the calibrated probability once both classes have at least :data:`MIN_PER_CLASS`
  studies, with a 95 % DeLong interval (:func:`auroc_delong`);
- the model card's figure for the loaded model (:func:`card_figures`) and a warning when the
  live interval lies wholly below the card's interval.

The two intervals are written here rather than imported: Wilson is five lines and DeLong's
variance (Sun and Xu's midrank form) fifteen, both closed-form and exact on hand-countable
examples (the tests check them that way), while the libraries that have them (``statsmodels``'
``proportion_confint``, ``scipy.stats.binomtest``; no maintained package has DeLong) are
training-time dependencies the serving install should not need.

Prometheus (:class:`AccuracyCollector`): ``triage_live_accuracy{model, version, finding, metric,
bound}`` (``bound`` = ``estimate``, ``lower``, ``upper``), ``triage_live_accuracy_count``
(the denominator), ``triage_live_accuracy_card{..., bound}`` and
``triage_live_accuracy_below_card{...}`` (1 when the live interval lies below the card's).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from triage_core.worklist import Worklist
    from triage_core.worklist.feedback import Labelled

logger = logging.getLogger(__name__)

#: Studies needed in each class (present, absent) before AUROC is shown.
MIN_PER_CLASS = 10
Z95 = 1.959963984540054
METRICS: tuple[str, ...] = ("sensitivity", "specificity", "ppv", "auroc")
CACHE_SECONDS = 30.0

Interval = tuple[float, float, float]  # estimate, lower, upper


def wilson(k: int, n: int, z: float = Z95) -> Interval | None:
    """``k`` of ``n``: the proportion and its Wilson score interval (``None`` for ``n = 0``)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def auroc_delong(positives: Sequence[float], negatives: Sequence[float]) -> Interval | None:
    """AUROC (ties count one half) and its 95 % DeLong interval, clipped to [0, 1].

    DeLong, DeLong and Clarke-Pearson (1988), in the midrank form of Sun and Xu (2014): the
    placement values ``V10`` (per positive, the share of negatives below it) and ``V01`` (per
    negative, the share of positives above it) give ``var = s2(V10)/m + s2(V01)/n``.
    ``None`` with fewer than two studies in either class.
    """
    x = np.asarray(positives, dtype=np.float64)
    y = np.asarray(negatives, dtype=np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return None
    combined = _midranks(np.concatenate([x, y]))
    v10 = (combined[:m] - _midranks(x)) / n
    v01 = 1.0 - (combined[m:] - _midranks(y)) / m
    auc = float(v10.mean())
    se = math.sqrt(float(v10.var(ddof=1)) / m + float(v01.var(ddof=1)) / n)
    return auc, max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)


# --------------------------------------------------------------------------------------------
# the model card's figures


@dataclass(frozen=True)
class Card:
    """The loaded model's identity and the per-finding figures of its card."""

    name: str = ""
    version: str = ""
    source: str = ""
    figures: Mapping[str, Mapping[str, Interval]] = field(default_factory=dict)

    def matches(self, name: str, version: str) -> bool:
        return bool(self.name) and (self.name, self.version) == (name, version)


def _triple(value: Any, ci: Any = None) -> Interval | None:
    """``[v, lo, hi]``, ``{"value"|"estimate", "ci95"|...}`` or a number (+ an interval)."""
    try:
        if isinstance(value, Mapping):
            ci = value.get("ci95", value.get("ci", ci))
            value = value.get("value", value.get("estimate"))
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3:
            v, lo, hi = (float(t) for t in value)
        else:
            v = float(value)
            if isinstance(ci, Sequence) and len(ci) == 2:
                lo, hi = float(ci[0]), float(ci[1])
            else:
                lo = hi = v
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(t) for t in (v, lo, hi)):
        return None
    return v, lo, hi


def card_figures(metrics: Mapping[str, Any], class_names: Sequence[str]) -> tuple[str, dict]:
    """Per finding, the card's sensitivity, specificity, PPV and AUROC with intervals.

    Read defensively from the spec's ``metrics``: the out-of-fold operating points
    (``operating_points[finding]`` with ``[value, lower, upper]`` triples) and AUROC
    (``oof.auroc[finding]``) when recorded; else the test split (``test.per_class``: recall,
    specificity, precision, support and ``auroc_ci95``), whose proportions get the Wilson
    interval of the counts the card states. What is not recorded is left out (shown "n/a").
    """
    out: dict[str, dict[str, Interval]] = {}
    points = metrics.get("operating_points")
    if isinstance(points, Mapping) and any(isinstance(points.get(c), Mapping) for c in class_names):
        aurocs = (metrics.get("oof") or {}).get("auroc") or {}
        for name in class_names:
            entry = points.get(name)
            figures = {}
            if isinstance(entry, Mapping):
                for metric in ("sensitivity", "specificity", "ppv"):
                    found = _triple(entry.get(metric))
                    if found is not None:
                        figures[metric] = found
            auc = _triple(aurocs.get(name)) if isinstance(aurocs, Mapping) else None
            if auc is not None:
                figures["auroc"] = auc
            out[name] = figures
        return "out-of-fold", out
    test = metrics.get("test")
    if not isinstance(test, Mapping) or not isinstance(test.get("per_class"), Mapping):
        return "", {}
    per_class = test["per_class"]
    images = int(float(test.get("images") or 0))
    for name in class_names:
        m = per_class.get(name)
        if not isinstance(m, Mapping):
            continue
        figures = {}
        try:
            support = int(float(m.get("support", 0)))
            recall, spec, prec = (float(m[k]) for k in ("recall", "specificity", "precision"))
        except (KeyError, TypeError, ValueError):
            recall = spec = prec = math.nan
            support = 0
        tp = round(recall * support) if math.isfinite(recall) else 0
        flagged = round(tp / prec) if math.isfinite(prec) and prec > 0 else 0
        for metric, value, k, n in (
            ("sensitivity", recall, tp, support),
            ("specificity", spec, round(spec * (images - support)), images - support),
            ("ppv", prec, tp, flagged),
        ):
            interval = wilson(k, n) if math.isfinite(value) and n > 0 else None
            if interval is not None:
                figures[metric] = (value, interval[1], interval[2])
        auc = _triple(m.get("auroc"), m.get("auroc_ci95"))
        if auc is not None:
            figures["auroc"] = auc
        out[name] = figures
    return "test split", out


def load_card(checkpoint: Path | None) -> Card:
    """The card of the checkpoint's JSON spec (the default checkpoint for ``None``); an empty
    :class:`Card` when it cannot be read (the page then shows "n/a")."""
    try:
        if checkpoint is None:
            from triage_core.models import default_checkpoint_path

            checkpoint = default_checkpoint_path()
        base = (
            checkpoint.with_suffix("")
            if checkpoint.suffix in (".json", ".safetensors")
            else (checkpoint)
        )
        data = json.loads(Path(f"{base}.json").read_text(encoding="utf-8"))
        names = [str(c) for c in data.get("class_names") or ()]
        source, figures = card_figures(dict(data.get("metrics") or {}), names)
        return Card(str(data.get("name") or ""), str(data.get("version") or ""), source, figures)
    except Exception as exc:  # noqa: BLE001 - no card is a page that says "n/a"
        logger.warning("no model card figures for live accuracy: %s", exc)
        return Card()


# --------------------------------------------------------------------------------------------
# live figures


def live_accuracy(labelled: Sequence[Labelled], card: Card) -> list[dict[str, Any]]:
    """Per model version and finding: counts, the four figures, the card's, the warnings.

    Each row: ``model``, ``version``, ``finding``, ``studies``, ``positives``, ``negatives``,
    ``tp``, ``fp``, ``tn``, ``fn``, ``live`` and ``card`` (metric -> ``(estimate, lower,
    upper)``, absent when undefined), ``counts`` (metric -> ``(k, n)``), ``below`` (metrics whose
    live interval lies wholly below the card's), ``card_source``.
    """
    groups: dict[tuple[str, str, str], list[Labelled]] = {}
    for row in labelled:
        groups.setdefault((row.model_name, row.model_version, row.finding), []).append(row)
    out = []
    for (model, version, finding), rows in sorted(groups.items()):
        tp = sum(r.truth and r.flagged for r in rows)
        fn = sum(r.truth and not r.flagged for r in rows)
        fp = sum(not r.truth and r.flagged for r in rows)
        tn = sum(not r.truth and not r.flagged for r in rows)
        counts = {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp), "ppv": (tp, tp + fp)}
        live: dict[str, Interval] = {}
        for metric, (k, n) in counts.items():
            interval = wilson(k, n)
            if interval is not None:
                live[metric] = interval
        pos = [r.probability for r in rows if r.truth]
        neg = [r.probability for r in rows if not r.truth]
        if len(pos) >= MIN_PER_CLASS and len(neg) >= MIN_PER_CLASS:
            auc = auroc_delong(pos, neg)
            if auc is not None:
                live["auroc"] = auc
        counts["auroc"] = (len(pos), len(neg))
        reference = dict(card.figures.get(finding, {})) if card.matches(model, version) else {}
        below = [
            m for m in METRICS if m in live and m in reference and live[m][2] < reference[m][1]
        ]
        out.append(
            {
                "model": model,
                "version": version,
                "finding": finding,
                "studies": len(rows),
                "positives": len(pos),
                "negatives": len(neg),
                "tp": tp,
                "fp": fp,
                "tn": tn,
                "fn": fn,
                "live": live,
                "card": reference,
                "counts": counts,
                "below": below,
                "card_source": card.source if reference else "",
            }
        )
    return out


_CARDS: dict[tuple[str, float], Card] = {}
_CARDS_LOCK = threading.Lock()


def cached_card(checkpoint: Path | None) -> Card:
    """:func:`load_card`, read again only when the spec file changes."""
    key = str(checkpoint)
    try:
        if checkpoint is None:
            from triage_core.models import default_checkpoint_path

            checkpoint = default_checkpoint_path()
        base = (
            checkpoint.with_suffix("")
            if checkpoint.suffix in (".json", ".safetensors")
            else (checkpoint)
        )
        mtime = Path(f"{base}.json").stat().st_mtime
    except Exception:  # noqa: BLE001 - load_card reports it
        mtime = -1.0
    with _CARDS_LOCK:
        hit = _CARDS.get((key, mtime))
    if hit is None:
        hit = load_card(checkpoint)
        with _CARDS_LOCK:
            _CARDS.clear()
            _CARDS[(key, mtime)] = hit
    return hit


def page_context(worklist: Worklist, checkpoint: Path | None) -> dict[str, Any]:
    """``accuracy``: what the operations page's live-accuracy table shows."""
    card = cached_card(checkpoint)
    try:
        rows = live_accuracy(worklist.feedback.labelled(), card)
    except Exception as exc:  # noqa: BLE001 - the rest of the page still shows
        logger.warning("live accuracy unavailable: %s", exc)
        rows = []
    return {
        "accuracy": {
            "rows": rows,
            "card": card,
            "metrics": METRICS,
            "min_per_class": MIN_PER_CLASS,
        }
    }


class AccuracyCollector:
    """Prometheus collector of :func:`live_accuracy` (computed at most every 30 s)."""

    def __init__(self, worklist: Worklist, checkpoint: Path | None) -> None:
        self.worklist = worklist
        self.checkpoint = checkpoint
        self._lock = threading.Lock()
        self._cached: tuple[float, list[dict[str, Any]]] | None = None

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > CACHE_SECONDS:
                rows = live_accuracy(
                    self.worklist.feedback.labelled(), cached_card(self.checkpoint)
                )
                self._cached = (time.monotonic(), rows)
            return self._cached[1]

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        labels = ["model", "version", "finding", "metric"]
        live = GaugeMetricFamily(
            "triage_live_accuracy",
            "live accuracy from readers' verdicts at the operating threshold (AUROC: of the "
            "probability), with its 95 % interval",
            labels=[*labels, "bound"],
        )
        count = GaugeMetricFamily(
            "triage_live_accuracy_count",
            "studies the live figure is computed over (its denominator; AUROC: positives)",
            labels=labels,
        )
        card = GaugeMetricFamily(
            "triage_live_accuracy_card",
            "the model card's figure, with its 95 % interval",
            labels=[*labels, "bound"],
        )
        below = GaugeMetricFamily(
            "triage_live_accuracy_below_card",
            "1 when the live 95 % interval lies wholly below the card's",
            labels=labels,
        )
        try:
            rows = self.rows()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail on a DB error
            logger.warning("live accuracy metrics unavailable: %s", exc)
            rows = []
        for row in rows:
            for metric in METRICS:
                key = [row["model"], row["version"], row["finding"], metric]
                count.add_metric(key, float(row["counts"][metric][1 if metric != "auroc" else 0]))
                if metric in row["live"]:
                    for bound, value in zip(
                        ("estimate", "lower", "upper"), row["live"][metric], strict=True
                    ):
                        live.add_metric([*key, bound], value)
                if metric in row["card"]:
                    for bound, value in zip(
                        ("estimate", "lower", "upper"), row["card"][metric], strict=True
                    ):
                        card.add_metric([*key, bound], value)
                    below.add_metric(key, 1.0 if metric in row["below"] else 0.0)
        yield from (live, count, card, below)
