"""The operations page (``/operations``) and the score-drift metrics.

What it shows, over the last :data:`WINDOW_DAYS` days: queue depth, studies finished per hour
(last 24 h), failed deliveries, inference time (median and 95th percentile of the per-study
``inference`` timing), and per finding the distribution of the study scores (10 bins) and the
share of studies flagged present, compared with the model card's reference.

The reference: the checkpoint's model card (``spec.metrics["test"]``) records, per finding,
recall, precision and support on its test split, so the share of test studies the model
flagged present at its threshold is ``recall * support / precision / images``. The model card
has no score histogram, so drift is judged on that share: the alarm is raised for a finding
when at least :data:`MIN_STUDIES` studies were scored in the window and the observed share
differs from the reference by more than :data:`DRIFT_THRESHOLD` (absolute). Exported to
Prometheus by :class:`DriftCollector` as ``triage_finding_present_share{finding}``,
``triage_finding_reference_share{finding}`` and ``triage_score_drift_alarm{finding}`` (0 or 1).

The queries are a handful of SELECTs of their own over the worklist's tables (their place is
``triage_core.worklist.queries``; they move there when it offers them).
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)

WINDOW_DAYS = 7.0
DRIFT_THRESHOLD = 0.25
MIN_STUDIES = 20
BINS = 10
CACHE_SECONDS = 30.0


def reference_shares(spec_metrics: Mapping[str, Any]) -> dict[str, float]:
    """Per finding, the share of test studies flagged present (empty when not recorded)."""
    test = spec_metrics.get("test") if isinstance(spec_metrics, Mapping) else None
    if not isinstance(test, Mapping):
        return {}
    images = float(test.get("images") or 0)
    out: dict[str, float] = {}
    for name, m in (test.get("per_class") or {}).items():
        try:
            recall, precision, support = (float(m[k]) for k in ("recall", "precision", "support"))
        except (KeyError, TypeError, ValueError):
            continue
        if images > 0 and precision > 0:
            out[str(name)] = min(1.0, recall * support / precision / images)
    return out


def spec_metrics(checkpoint: Path | None) -> dict[str, Any]:
    """``metrics`` of the checkpoint's JSON spec (the default checkpoint when ``None``)."""
    try:
        if checkpoint is None:
            from triage_core.models import default_checkpoint_path

            checkpoint = default_checkpoint_path()
        base = checkpoint.with_suffix("") if checkpoint.suffix == ".json" else checkpoint
        data = json.loads(Path(f"{base}.json").read_text(encoding="utf-8"))
        return dict(data.get("metrics") or {})
    except Exception as exc:  # noqa: BLE001 - no reference is a page that says so
        logger.warning("no model reference for drift: %s", exc)
        return {}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summary(
    worklist: Worklist, reference: Mapping[str, float], now: float | None = None
) -> dict[str, Any]:
    """Everything the operations page and the drift metrics show."""
    from sqlalchemy import select

    now = time.time() if now is None else now
    since = now - WINDOW_DAYS * 86400.0
    t = worklist.db.tables
    s, r, d = t.studies, t.results, t.deliveries
    counts = worklist.counts_by_status()
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
        f["share"] = f["present"] / f["n"] if f["n"] else None
        f["reference"] = reference.get(name)
        f["drift"] = (
            abs(f["share"] - f["reference"])
            if f["share"] is not None and f["reference"] is not None
            else None
        )
        f["alarm"] = bool(
            f["drift"] is not None and f["n"] >= MIN_STUDIES and f["drift"] > DRIFT_THRESHOLD
        )
        top = max(f["hist"]) or 1
        f["bars"] = [round(100.0 * v / top, 1) for v in f["hist"]]
    return {
        "counts": counts,
        "queue_depth": counts.get("queued", 0) + counts.get("receiving", 0),
        "processing": counts.get("processing", 0),
        "per_hour": hours,
        "last_hour": hours[-1],
        "last_day": sum(hours),
        "delivery_counts": worklist.delivery_counts_by_status(),
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
        "drift_threshold": DRIFT_THRESHOLD,
        "min_studies": MIN_STUDIES,
    }


class DriftCollector:
    """Prometheus collector of the drift figures (computed at most every 30 s)."""

    def __init__(self, worklist: Worklist, reference: Mapping[str, float]) -> None:
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
            "share flagged present on the model card's test split",
            labels=["finding"],
        )
        alarm = GaugeMetricFamily(
            "triage_score_drift_alarm",
            f"1 when the present share is more than {DRIFT_THRESHOLD} from the reference "
            f"(at least {MIN_STUDIES} studies)",
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
            alarm.add_metric([name], 1.0 if f["alarm"] else 0.0)
        yield from (share, ref, alarm)
