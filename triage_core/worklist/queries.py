"""The read side: JSON-ready rows for the CLI, the HTTP API and web pages.

Timestamps are ISO 8601 UTC strings; spool paths are never exposed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select

from triage_core.errors import WorklistError
from triage_core.priority import effective_priority
from triage_core.spec import PRIORITY_LEVELS
from triage_core.worklist.database import Database
from triage_core.worklist.records import (
    DELIVERY_STATUSES,
    STUDY_STATUSES,
    iso,
    timestamp,
)
from triage_core.worklist.schema import Tables

logger = logging.getLogger(__name__)

AgingFunction = Callable[[float, float], float]


def aging_function(aging: Any) -> AgingFunction | None:
    """Turn ``aging`` (None, an ``AgingRule`` or a callable) into ``f(score, waited) -> float``."""
    if aging is None:
        return None
    if callable(aging):
        fn: AgingFunction = aging
        return fn

    def apply(score: float, waited: float) -> float:
        return float(effective_priority(score, waited, rule=aging))

    return apply


@dataclass(frozen=True)
class _Filter:
    """The validated filters of :meth:`WorklistQueries.list_worklist`."""

    statuses: list[str] | None
    min_score: float | None
    min_rank: int | None


def _parse_filter(status: str | Sequence[str] | None, min_priority: float | str | None) -> _Filter:
    statuses: list[str] | None = None
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        bad = [s for s in statuses if s not in STUDY_STATUSES]
        if bad:
            raise WorklistError(f"unknown status {bad[0]!r}; use one of {STUDY_STATUSES}")
    if isinstance(min_priority, str):
        if min_priority not in PRIORITY_LEVELS:
            raise WorklistError(
                f"unknown priority level {min_priority!r}; use one of {PRIORITY_LEVELS}"
            )
        return _Filter(statuses, None, PRIORITY_LEVELS.index(min_priority))
    return _Filter(statuses, None if min_priority is None else float(min_priority), None)


def _row_dict(row: Any, findings: dict[str, Any], count: int, eff: float | None) -> dict[str, Any]:
    return {
        "study_uid": row.study_uid,
        "status": row.status,
        "reason": row.reason,
        "error": row.error,
        "priority_score": row.priority_score,
        "effective_priority": eff,
        "priority_level": row.priority_level,
        "low_confidence": bool(row.low_confidence),
        "ood_score": row.ood_score,
        "findings": findings,
        "model_name": row.model_name,
        "model_version": row.model_version,
        "num_instances": count,
        "received_at": iso(row.received_at),
        "updated_at": iso(row.updated_at),
        "accession_hash": row.accession_hash,
    }


def _image_dict(sop_uid: str, inst: Any, res: Any) -> dict[str, Any]:
    img: dict[str, Any] = {
        "sop_uid": sop_uid,
        "series_uid": inst.series_uid if inst is not None else "",
        "sop_class_uid": inst.sop_class_uid if inst is not None else "",
        "received_at": iso(inst.received_at) if inst is not None else None,
        "eligible": None,
        "reason": "",
        "probabilities": {},
        "error": "",
    }
    if res is not None:
        img.update(
            eligible=bool(res.eligible),
            reason=res.reason,
            probabilities=json.loads(res.probabilities),
            error=res.error,
        )
    return img


def _study_findings(conn: Connection, tables: Tables, study_uid: str) -> dict[str, Any]:
    """The ``findings`` of :meth:`WorklistQueries.study_detail`."""
    r = tables.results
    return {
        fr.finding: {
            "probability": float(fr.probability),
            "present": bool(fr.present),
            "threshold": float(fr.threshold),
            "source_uid": fr.source_uid,
        }
        for fr in conn.execute(select(r).where(r.c.study_uid == study_uid).order_by(r.c.id))
    }


def _study_images(conn: Connection, tables: Tables, study_uid: str) -> list[dict[str, Any]]:
    """The ``images`` of :meth:`WorklistQueries.study_detail`."""
    i, ir = tables.instances, tables.image_results
    per_image = {x.uid: x for x in conn.execute(select(ir).where(ir.c.study_uid == study_uid))}
    images = [
        _image_dict(inst.sop_uid, inst, per_image.pop(inst.sop_uid, None))
        for inst in conn.execute(
            select(i).where(i.c.study_uid == study_uid).order_by(i.c.received_at, i.c.sop_uid)
        )
    ]
    # results keyed by something other than a received SOP UID
    images.extend(_image_dict(uid, None, res) for uid, res in per_image.items())
    return images


def _study_deliveries(conn: Connection, tables: Tables, study_uid: str) -> list[dict[str, Any]]:
    """The ``deliveries`` of :meth:`WorklistQueries.study_detail`."""
    d = tables.deliveries
    return [
        {
            "id": int(x.id),
            "sop_uid": x.sop_uid,
            "destination": x.destination,
            "status": x.status,
            "attempts": int(x.attempts),
            "next_attempt_at": iso(x.next_attempt_at),
            "last_error": x.last_error,
            "sent_at": iso(x.sent_at),
        }
        for x in conn.execute(select(d).where(d.c.study_uid == study_uid).order_by(d.c.id))
    ]


class WorklistQueries:
    """Read-only queries (the retention sweep is
    :class:`~triage_core.worklist.retention.Retention`)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def counts_by_status(self) -> dict[str, int]:
        """Number of studies per status (every status present, zeros included)."""
        return self._counts(self._db.tables.studies, STUDY_STATUSES)

    def delivery_counts_by_status(self) -> dict[str, int]:
        """Number of deliveries per status (every status present, zeros included)."""
        return self._counts(self._db.tables.deliveries, DELIVERY_STATUSES)

    def _counts(self, table: Any, statuses: tuple[str, ...]) -> dict[str, int]:
        out = dict.fromkeys(statuses, 0)
        with self._db.read() as conn:
            query = select(table.c.status, func.count()).group_by(table.c.status)
            for status, n in conn.execute(query):
                out[str(status)] = int(n)
        return out

    def _row_dicts(
        self, conn: Connection, rows: Sequence[Any], effective: Mapping[str, float | None]
    ) -> list[dict[str, Any]]:
        if not rows:
            return []
        r, i = self._db.tables.results, self._db.tables.instances
        uids = [row.study_uid for row in rows]
        findings: dict[str, dict[str, dict[str, Any]]] = {uid: {} for uid in uids}
        for fr in conn.execute(
            select(r.c.study_uid, r.c.finding, r.c.probability, r.c.present)
            .where(r.c.study_uid.in_(uids))
            .order_by(r.c.id)
        ):
            findings[fr.study_uid][fr.finding] = {
                "probability": float(fr.probability),
                "present": bool(fr.present),
            }
        counts: dict[str, int] = {
            uid: int(n)
            for uid, n in conn.execute(
                select(i.c.study_uid, func.count())
                .where(i.c.study_uid.in_(uids))
                .group_by(i.c.study_uid)
            )
        }
        return [
            _row_dict(
                row,
                findings[row.study_uid],
                counts.get(row.study_uid, 0),
                effective.get(row.study_uid),
            )
            for row in rows
        ]

    def list_worklist(
        self,
        status: str | Sequence[str] | None = None,
        min_priority: float | str | None = None,
        limit: int = 50,
        aging: Any = None,
        now: float | None = None,
    ) -> list[dict[str, Any]]:
        """The worklist, most urgent first.

        Parameters
        ----------
        status : str or sequence of str, optional
            Only these statuses (default: all).
        min_priority : float or str, optional
            A number keeps rows whose effective priority is at least that; a level name
            (``routine``, ``urgent``, ``critical``) keeps rows at or above that level. Either way
            unscored studies are left out.
        limit : int
            At most this many rows (1 or more).
        aging : AgingRule or callable, optional
            ``triage_core.priority.AgingRule`` (applied with
            ``triage_core.priority.effective_priority(score, waited_seconds, rule)``) or a
            function ``(score, waited_seconds) -> float``; ``None`` means no aging.
        now : float, optional
            Current time, for the waited time.

        Returns
        -------
        list of dict
            Rows with the keys ``study_uid``, ``status``, ``reason``, ``error``,
            ``priority_score``, ``effective_priority``, ``priority_level``, ``findings``
            ({name: {probability, present}}), ``model_name``, ``model_version``,
            ``num_instances``, ``received_at``, ``updated_at``, ``accession_hash``; ordered by
            effective priority (highest first, unscored studies last) then arrival.

        Notes
        -----
        With aging, the order is computed in Python over the (uid, score, arrival) triple of
        every row matching ``status``: correct for any aging rule, O(N) in the matching rows
        (~100 ms for 10^5 rows), then details are fetched for the ``limit`` rows returned.
        Without aging the ordering and limit run in SQL.
        """
        if int(limit) < 1:
            raise WorklistError(f"limit must be >= 1, got {limit!r}")
        flt = _parse_filter(status, min_priority)
        age_fn = aging_function(aging)
        s = self._db.tables.studies
        conditions = []
        if flt.statuses is not None:
            conditions.append(s.c.status.in_(flt.statuses))
        if flt.min_score is not None or flt.min_rank is not None:
            conditions.append(s.c.priority_score.is_not(None))
        if flt.min_rank is not None:
            conditions.append(s.c.priority_level.in_(list(PRIORITY_LEVELS[flt.min_rank :])))
        with self._db.read() as conn:
            if age_fn is None:
                query = select(s).where(*conditions)
                if flt.min_score is not None:
                    query = query.where(s.c.priority_score >= flt.min_score)
                query = query.order_by(
                    s.c.priority_score.desc().nulls_last(), s.c.received_at, s.c.id
                ).limit(int(limit))
                rows = conn.execute(query).all()
                effective = {
                    r.study_uid: (None if r.priority_score is None else float(r.priority_score))
                    for r in rows
                }
                return self._row_dicts(conn, rows, effective)
            return self._aged_rows(conn, conditions, flt.min_score, age_fn, int(limit), now)

    def _aged_rows(
        self,
        conn: Connection,
        conditions: list[Any],
        min_score: float | None,
        age_fn: AgingFunction,
        limit: int,
        now: float | None,
    ) -> list[dict[str, Any]]:
        ts = timestamp(now)
        s = self._db.tables.studies
        candidates = conn.execute(
            select(s.c.study_uid, s.c.priority_score, s.c.received_at, s.c.id).where(*conditions)
        ).all()
        scored: list[tuple[float | None, float, int, str]] = []
        for uid, score, received, row_id in candidates:
            eff = (
                None
                if score is None
                else float(age_fn(float(score), max(0.0, ts - float(received))))
            )
            if min_score is not None and (eff is None or eff < min_score):
                continue
            scored.append((eff, float(received), int(row_id), uid))
        scored.sort(key=lambda t: (t[0] is None, -(t[0] if t[0] is not None else 0.0), t[1], t[2]))
        top = scored[:limit]
        effective = {uid: eff for eff, _, _, uid in top}
        by_uid = (
            {
                r.study_uid: r
                for r in conn.execute(select(s).where(s.c.study_uid.in_(list(effective)))).all()
            }
            if top
            else {}
        )
        rows = [by_uid[uid] for _, _, _, uid in top if uid in by_uid]
        return self._row_dicts(conn, rows, effective)

    def study_detail(
        self, study_uid: str, aging: Any = None, now: float | None = None
    ) -> dict[str, Any] | None:
        """Everything known about one study, or ``None`` if unknown.

        The row of :meth:`list_worklist` plus ``findings`` (with ``threshold`` and
        ``source_uid``), ``images`` (per instance: ``sop_uid``, ``series_uid``,
        ``sop_class_uid``, ``received_at`` and, once processed, ``eligible``, ``reason``,
        ``probabilities``, ``error``), ``deliveries`` (``id``, ``sop_uid``, ``destination``,
        ``status``, ``attempts``, ``next_attempt_at``, ``last_error``, ``sent_at``), ``timings``,
        ``attempts``, ``lease_owner``, ``lease_expires_at``, ``queued_at``, ``completed_at``.
        """
        s = self._db.tables.studies
        age_fn = aging_function(aging)
        with self._db.read() as conn:
            row = conn.execute(select(s).where(s.c.study_uid == study_uid)).first()
            if row is None:
                return None
            eff: float | None = None
            if row.priority_score is not None:
                eff = float(row.priority_score)
                if age_fn is not None:
                    waited = max(0.0, timestamp(now) - float(row.received_at))
                    eff = float(age_fn(eff, waited))
            out = self._row_dicts(conn, [row], {study_uid: eff})[0]
            tables = self._db.tables
            out["findings"] = _study_findings(conn, tables, study_uid)
            out["images"] = _study_images(conn, tables, study_uid)
            out["deliveries"] = _study_deliveries(conn, tables, study_uid)
        out["timings"] = json.loads(row.timings or "{}")
        out["attempts"] = int(row.attempts)
        out["lease_owner"] = row.lease_owner
        out["lease_expires_at"] = iso(row.lease_expires_at)
        out["queued_at"] = iso(row.queued_at)
        out["completed_at"] = iso(row.completed_at)
        return out

    def delivery_states(self, study_uids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Per study, per destination (sorted): its objects by delivery status.

        Each entry has ``destination``, ``sent``, ``pending``, ``failed``, ``total``, ``state``
        (``failed`` if any failed, else ``pending`` if any pending, else ``sent``), ``attempts``
        (the most of any object) and ``last_error`` (of an object not sent, or ``""``). One
        grouped SELECT, for the CLI table and the web pages.
        """
        if not study_uids:
            return {}
        d = self._db.tables.deliveries
        acc: dict[tuple[str, str], dict[str, Any]] = {}
        with self._db.read() as conn:
            rows = conn.execute(
                select(
                    d.c.study_uid,
                    d.c.destination,
                    d.c.status,
                    func.count(),
                    func.max(d.c.attempts),
                    func.max(d.c.last_error),
                )
                .where(d.c.study_uid.in_(list(study_uids)))
                .group_by(d.c.study_uid, d.c.destination, d.c.status)
            )
            for study, dest, status, count, attempts, error in rows:
                entry = acc.setdefault(
                    (study, dest),
                    {"sent": 0, "pending": 0, "failed": 0, "attempts": 0, "last_error": ""},
                )
                if status in ("sent", "pending", "failed"):
                    entry[status] += int(count)
                entry["attempts"] = max(entry["attempts"], int(attempts or 0))
                if status != "sent" and error:
                    entry["last_error"] = str(error)
        out: dict[str, list[dict[str, Any]]] = {}
        for (study, dest), e in sorted(acc.items()):
            state = "failed" if e["failed"] else "pending" if e["pending"] else "sent"
            total = e["sent"] + e["pending"] + e["failed"]
            out.setdefault(study, []).append(
                {"destination": dest, **e, "total": total, "state": state}
            )
        return out

    def instance_files(
        self,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_uid: str | None = None,
    ) -> list[tuple[str, str, str, str, Path]]:
        """Received instances as ``(study, series, sop, sop_class, path)``, oldest first,
        optionally of one study, series or instance (the catalog of QIDO-RS and WADO-RS)."""
        i = self._db.tables.instances
        query = select(i.c.study_uid, i.c.series_uid, i.c.sop_uid, i.c.sop_class_uid, i.c.path)
        for column, value in (
            (i.c.study_uid, study_uid),
            (i.c.series_uid, series_uid),
            (i.c.sop_uid, sop_uid),
        ):
            if value is not None:
                query = query.where(column == value)
        with self._db.read() as conn:
            rows = conn.execute(query.order_by(i.c.received_at, i.c.sop_uid)).all()
        return [(r[0], r[1], r[2], r[3], Path(r[4])) for r in rows]
