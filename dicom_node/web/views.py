"""What the pages show, computed from the worklist's rows (no HTML here).

:func:`add_thresholds` is the one query of its own (one SELECT over the results of the rows on
screen); it belongs in ``triage_core.worklist.queries`` and moves there when that module offers
it. The delivery states of the rows come from
:meth:`~triage_core.worklist.queries.WorklistQueries.delivery_states`, as in ``triage worklist``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from triage_core.worklist import Worklist

#: Time filter choices of the worklist page: label -> seconds.
SINCE_CHOICES: dict[str, float] = {
    "1h": 3600.0,
    "6h": 6 * 3600.0,
    "24h": 86400.0,
    "7d": 7 * 86400.0,
}
#: Waiting time (seconds) after which an unfinished study is shown as aging / overdue.
AGING_AFTER = 15 * 60.0
OVERDUE_AFTER = 60 * 60.0
TOP_FINDINGS = 3
UNFINISHED = ("receiving", "queued", "processing")


def add_thresholds(worklist: Worklist, rows: Sequence[dict[str, Any]]) -> None:
    """Add each finding's operating ``threshold`` to the rows' ``findings`` (one SELECT)."""
    uids = [r["study_uid"] for r in rows if r.get("findings")]
    if not uids:
        return
    from sqlalchemy import select

    r = worklist.db.tables.results
    by_uid = {row["study_uid"]: row for row in rows}
    with worklist.db.read() as conn:
        for study, finding, threshold in conn.execute(
            select(r.c.study_uid, r.c.finding, r.c.threshold).where(r.c.study_uid.in_(uids))
        ):
            entry = by_uid[study]["findings"].get(finding)
            if entry is not None:
                entry["threshold"] = float(threshold)


def parse_time(iso_text: str | None) -> float | None:
    """An ISO 8601 timestamp of the worklist as epoch seconds."""
    if not iso_text:
        return None
    try:
        return datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def short_time(iso_text: str | None) -> str:
    """``2026-11-30T01:10:51.253925Z`` -> ``2026-11-30 01:10:51Z`` (``-`` when empty)."""
    if not iso_text:
        return "–"
    day, _, clock = iso_text.partition("T")
    return f"{day} {clock[:8]}Z" if clock else day


def duration(seconds: float | None) -> str:
    """``42 s``, ``7 min``, ``3 h 05``, ``2 d 4 h``."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d}"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def top_findings(findings: Mapping[str, Mapping[str, Any]], n: int = TOP_FINDINGS) -> list[Any]:
    """The ``n`` most probable findings, ``(name, data)`` pairs."""
    return sorted(findings.items(), key=lambda kv: -float(kv[1].get("probability", 0.0)))[:n]


def waiting(row: Mapping[str, Any], now: float) -> tuple[str, str]:
    """Waiting time text and its class: ``fresh``, ``aging``, ``overdue`` or ``finished``."""
    received = parse_time(row.get("received_at"))
    if received is None:
        return "-", "fresh"
    if row.get("status") not in UNFINISHED:
        finished = parse_time(row.get("updated_at")) or now
        return duration(finished - received), "finished"
    waited = now - received
    klass = "overdue" if waited >= OVERDUE_AFTER else "aging" if waited >= AGING_AFTER else "fresh"
    return duration(waited), klass


def within(rows: Iterable[dict[str, Any]], since: str | None, now: float) -> list[dict[str, Any]]:
    """Rows received in the last ``since`` (a key of :data:`SINCE_CHOICES`; None: all)."""
    if since not in SINCE_CHOICES:
        return list(rows)
    cutoff = now - SINCE_CHOICES[since]
    return [r for r in rows if (parse_time(r.get("received_at")) or 0.0) >= cutoff]


def now() -> float:
    return time.time()
