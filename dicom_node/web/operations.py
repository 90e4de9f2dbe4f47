"""The operations page (``/operations``) and the score-drift metrics.

What it shows, over the last :data:`WINDOW_DAYS` days: queue depth, studies finished per hour
(last 24 h), failed deliveries, inference time (median and 95th percentile of the per-study
``inference`` timing), and per finding the distribution of the study scores against the model's
reference distribution.

The reference: the checkpoint's spec carries, per finding, the histogram of its out-of-fold
calibrated probabilities in :data:`BINS` equal-width bins on [0, 1] and the share flagged at the
threshold (``ModelSpec.drift``, written by ``training.oof.drift_reference``). Drift is judged on
the whole score distribution with the Kolmogorov-Smirnov distance: ``D`` is the largest gap
between the cumulative shares of the window's study scores and of the reference, both on the
same 20-bin grid. The alarm is raised for a finding when at least :data:`MIN_STUDIES` studies
were scored in the window and ``D`` exceeds the two-sample KS critical value at level 0.001,
``KS_CRITICAL * sqrt((n + m) / (n m))`` (``n`` window studies, ``m`` reference images; 1.95 is
the asymptotic Kolmogorov quantile). A fixed distance would alarm on noise with few studies and
never with many; the critical value is what separates a shift from sampling noise. Chosen over
the population stability index, whose expected value under no shift is about ``bins / n`` (0.5
for 40 studies in 20 bins): it would need a threshold that moves with ``n`` too.

Exported to Prometheus by :class:`DriftCollector`: ``triage_score_ks_distance{finding}``,
``triage_score_ks_critical{finding}``, ``triage_score_drift_alarm{finding}`` (0 or 1),
``triage_finding_present_share{finding}`` and ``triage_finding_reference_share{finding}``.

The queries are a handful of SELECTs of their own over the worklist's tables (their place is
``triage_core.worklist.queries``; they move there when it offers them).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

WINDOW_DAYS = 7.0
#: Asymptotic Kolmogorov quantile for a 0.001 level (two-sample KS critical value factor).
KS_CRITICAL = 1.95
MIN_STUDIES = 30
#: Bins of the score histograms (the spec's reference has the same).
BINS = 20
CACHE_SECONDS = 30.0


@dataclass(frozen=True)
class FindingReference:
    """The spec's drift reference of one finding: histogram shares, flagged share, images."""

    histogram: tuple[float, ...]
    positive_share: float
    images: int


def drift_reference(checkpoint: Path | None) -> dict[str, FindingReference]:
    """Per finding, the drift reference of the checkpoint's spec (the default checkpoint when
    ``None``); empty (no alarm, the page says "not recorded") when the spec has none."""
    try:
        if checkpoint is None:
            from triage_core.models import default_checkpoint_path

            checkpoint = default_checkpoint_path()
        base = checkpoint.with_suffix("") if checkpoint.suffix == ".json" else checkpoint
        data = json.loads(Path(f"{base}.json").read_text(encoding="utf-8"))
        drift = data.get("drift") or {}
        if not drift:
            logger.warning("the model's spec has no drift reference; drift is not judged")
            return {}
        if int(drift["bins"]) != BINS:
            raise ValueError(f"reference has {drift['bins']} bins, the panel {BINS}")
        return {
            str(name): FindingReference(
                tuple(float(v) for v in entry["histogram"]),
                float(entry["positive_share"]),
                int(drift["images"]),
            )
            for name, entry in drift["classes"].items()
        }
    except Exception as exc:  # noqa: BLE001 - no reference is a page that says so
        logger.warning("no model reference for drift: %s", exc)
        return {}


def ks_distance(counts: Sequence[int], reference: Sequence[float]) -> float:
    """Largest gap between the cumulative shares of ``counts`` and of ``reference`` (both on
    the same bins)."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    gap, live, ref = 0.0, 0.0, 0.0
    for c, r in zip(counts, reference, strict=True):
        live += c / total
        ref += r
        gap = max(gap, abs(live - ref))
    return gap


def ks_critical(n: int, m: int) -> float:
    """Two-sample KS critical distance at level 0.001 for ``n`` and ``m`` observations."""
    return KS_CRITICAL * math.sqrt((n + m) / (n * m)) if n > 0 and m > 0 else math.inf


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summary(
    worklist: Worklist, reference: Mapping[str, FindingReference], now: float | None = None
) -> dict[str, Any]:
    """Everything the operations page and the drift metrics show."""
    from sqlalchemy import select

    now = time.time() if now is None else now
    since = now - WINDOW_DAYS * 86400.0
    t = worklist.db.tables
    s, r, d = t.studies, t.results, t.deliveries
    counts = worklist.queries.counts_by_status()
    with worklist.db.read() as conn:
        finished = conn.execute(
            select(s.c.completed_at, s.c.timings, s.c.status).where(
                s.c.completed_at.is_not(None), s.c.completed_at >= since
            )
        ).all()
        scores = conn.execute(
            select(r.c.finding, r.c.probability, r.c.present)
            .join(s, s.c.study_uid == r.c.study_uid)
            .where(s.c.completed_at >= since)
        ).all()
        failed = conn.execute(
            select(d.c.study_uid, d.c.destination, d.c.attempts, d.c.last_error, d.c.updated_at)
            .where(d.c.status == "failed")
            .order_by(d.c.updated_at.desc())
            .limit(20)
        ).all()
    hours = [0] * 24
    inference: list[float] = []
    for completed, timings, _status in finished:
        age = now - float(completed)
        if 0 <= age < 86400:
            hours[23 - int(age // 3600)] += 1
        try:
            value = json.loads(timings or "{}").get("inference")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, int | float):
            inference.append(float(value))
    findings: dict[str, dict[str, Any]] = {}
    for name, probability, present in scores:
        f = findings.setdefault(name, {"n": 0, "present": 0, "hist": [0] * BINS})
        f["n"] += 1
        f["present"] += int(bool(present))
        f["hist"][min(BINS - 1, max(0, int(float(probability) * BINS)))] += 1
    for name in set(reference) | set(findings):
        f = findings.setdefault(name, {"n": 0, "present": 0, "hist": [0] * BINS})
        ref = reference.get(name)
        f["share"] = f["present"] / f["n"] if f["n"] else None
        f["reference"] = ref.positive_share if ref else None
        f["distance"] = ks_distance(f["hist"], ref.histogram) if ref and f["n"] else None
        f["critical"] = ks_critical(f["n"], ref.images) if ref and f["n"] else None
        f["alarm"] = bool(
            f["distance"] is not None and f["n"] >= MIN_STUDIES and f["distance"] > f["critical"]
        )
        top = max(f["hist"]) or 1
        f["bars"] = [round(100.0 * v / top, 1) for v in f["hist"]]
        ref_top = max(ref.histogram) if ref else 0.0
        f["reference_bars"] = (
            [round(100.0 * v / ref_top, 1) for v in ref.histogram] if ref and ref_top else []
        )
    return {
        "counts": counts,
        "queue_depth": counts.get("queued", 0) + counts.get("receiving", 0),
        "processing": counts.get("processing", 0),
        "per_hour": hours,
        "last_hour": hours[-1],
        "last_day": sum(hours),
        "delivery_counts": worklist.queries.delivery_counts_by_status(),
        "failed": [
            {
                "study_uid": x.study_uid,
                "destination": x.destination,
                "attempts": int(x.attempts),
                "last_error": x.last_error,
            }
            for x in failed
        ],
        "inference_median": statistics.median(inference) if inference else None,
        "inference_p95": _percentile(inference, 0.95),
        "inference_n": len(inference),
        "findings": dict(sorted(findings.items())),
        "window_days": WINDOW_DAYS,
        "ks_critical": KS_CRITICAL,
        "min_studies": MIN_STUDIES,
        "bins": BINS,
    }


class DriftCollector:
    """Prometheus collector of the drift figures (computed at most every 30 s)."""

    def __init__(self, worklist: Worklist, reference: Mapping[str, FindingReference]) -> None:
        self.worklist = worklist
        self.reference = dict(reference)
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    def findings(self) -> dict[str, Any]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > CACHE_SECONDS:
                data = summary(self.worklist, self.reference)["findings"]
                self._cached = (time.monotonic(), data)
            return self._cached[1]

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        share = GaugeMetricFamily(
            "triage_finding_present_share",
            f"share of studies flagged present per finding, last {WINDOW_DAYS:g} days",
            labels=["finding"],
        )
        ref = GaugeMetricFamily(
            "triage_finding_reference_share",
            "share flagged present in the model's out-of-fold reference",
            labels=["finding"],
        )
        distance = GaugeMetricFamily(
            "triage_score_ks_distance",
            "Kolmogorov-Smirnov distance of the window's study scores from the reference",
            labels=["finding"],
        )
        critical = GaugeMetricFamily(
            "triage_score_ks_critical",
            "KS distance above which the drift alarm is raised (level 0.001)",
            labels=["finding"],
        )
        alarm = GaugeMetricFamily(
            "triage_score_drift_alarm",
            f"1 when the KS distance exceeds its critical value (at least {MIN_STUDIES} studies)",
            labels=["finding"],
        )
        try:
            findings = self.findings()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail on a DB error
            logger.warning("drift metrics unavailable: %s", exc)
            findings = {}
        for name, f in findings.items():
            if f["share"] is not None:
                share.add_metric([name], f["share"])
            if f["reference"] is not None:
                ref.add_metric([name], f["reference"])
            if f["distance"] is not None:
                distance.add_metric([name], f["distance"])
                critical.add_metric([name], f["critical"])
            alarm.add_metric([name], 1.0 if f["alarm"] else 0.0)
        yield from (share, ref, distance, critical, alarm)
