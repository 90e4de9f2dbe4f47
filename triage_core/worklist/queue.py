"""The study queue: stable studies are queued, claimed with a lease, completed or re-queued.

Wake-ups (see :mod:`triage_core.worklist.wakeup`): every transaction that makes a study
claimable (queued when stable, re-queued after a failure or an expired lease) announces it, in
the process and, on PostgreSQL, with ``NOTIFY``; completing a study with deliveries announces
those. Workers wait with :meth:`StudyQueue.waiter` instead of polling.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Table, delete, func, select, update

from triage_core.errors import WorklistError
from triage_core.spec import StudyResult
from triage_core.uids import check_uid
from triage_core.worklist.database import Database
from triage_core.worklist.deliveries import Deliveries
from triage_core.worklist.records import ClaimedStudy, Recovered, timestamp
from triage_core.worklist.schema import Tables
from triage_core.worklist.wakeup import (
    DELIVERY_DUE,
    INSTANCE_RECEIVED,
    STUDY_QUEUED,
    Waiter,
    WakeUps,
)

logger = logging.getLogger(__name__)

#: ``(sop_uid, path, destination)`` of an output object to send.
DeliverySpec = tuple[str, str | Path, str]


@dataclass(frozen=True)
class _ResultRows:
    """A validated :class:`StudyResult` as rows for the results tables."""

    score: float
    findings: list[dict[str, Any]]
    images: list[dict[str, Any]]
    timings: str


def _check_result(study_uid: str, result: StudyResult, deliveries: Sequence[DeliverySpec]) -> None:
    if result.study_uid != study_uid:
        raise WorklistError(f"result is for study {result.study_uid}, not {study_uid}")
    if result.status not in ("done", "not_eligible"):
        raise WorklistError(
            f"result status must be 'done' or 'not_eligible', got {result.status!r}"
        )
    if not math.isfinite(float(result.priority_score)):
        raise WorklistError(f"priority score must be finite, got {result.priority_score!r}")
    names = [f.name for f in result.findings]
    if len(set(names)) != len(names):
        raise WorklistError(f"result repeats a finding: {names}")
    for f in result.findings:
        if not math.isfinite(float(f.probability)):
            raise WorklistError(f"finding {f.name}: probability {f.probability!r}")
    uids = [img.uid for img in result.images]
    if len(set(uids)) != len(uids):
        raise WorklistError("result repeats an image UID")
    for sop_uid, _path, destination in deliveries:
        check_uid(sop_uid, "SOP Instance UID")
        if not destination:
            raise WorklistError("delivery destination must not be empty")


def _result_rows(study_uid: str, result: StudyResult) -> _ResultRows:
    findings = [
        {
            "study_uid": study_uid,
            "finding": f.name,
            "probability": float(f.probability),
            "present": bool(f.present),
            "threshold": float(f.threshold),
            "source_uid": f.source_uid,
        }
        for f in result.findings
    ]
    images = [
        {
            "study_uid": study_uid,
            "uid": img.uid,
            "eligible": bool(img.eligible),
            "reason": img.reason,
            "probabilities": json.dumps({k: float(v) for k, v in img.probabilities.items()}),
            "error": img.error,
        }
        for img in result.images
    ]
    timings = json.dumps({k: float(v) for k, v in result.timings.items()})
    return _ResultRows(float(result.priority_score), findings, images, timings)


def _held(conn: Connection, studies: Table, study_uid: str, worker_id: str) -> Any:
    """The study's row, locked, if ``worker_id`` holds its lease; else raise."""
    row = conn.execute(
        select(studies.c.status, studies.c.lease_owner, studies.c.attempts, studies.c.rerun)
        .where(studies.c.study_uid == study_uid)
        .with_for_update()
    ).first()
    if row is None:
        raise WorklistError(f"unknown study {study_uid}")
    if row.status != "processing" or row.lease_owner != worker_id:
        raise WorklistError(
            f"worker {worker_id} no longer holds the lease on study {study_uid} "
            f"(status {row.status}, owner {row.lease_owner})"
        )
    return row


def _replace_results(conn: Connection, tables: Tables, study_uid: str, rows: _ResultRows) -> None:
    for table in (tables.results, tables.image_results):
        conn.execute(delete(table).where(table.c.study_uid == study_uid))
    if rows.findings:
        conn.execute(tables.results.insert(), rows.findings)
    if rows.images:
        conn.execute(tables.image_results.insert(), rows.images)


def _finish(
    conn: Connection, studies: Table, held: Any, result: StudyResult, rows: _ResultRows, ts: float
) -> str:
    """Set the study's final status and summary; a re-run flag sends it to ``receiving``."""
    new_status = "receiving" if held.rerun else result.status
    conn.execute(
        update(studies)
        .where(studies.c.study_uid == result.study_uid)
        .values(
            status=new_status,
            attempts=0 if held.rerun else held.attempts,
            reason=result.reason,
            error="",
            priority_score=rows.score,
            priority_level=result.priority_level,
            low_confidence=result.low_confidence,
            ood_score=result.ood_score,
            model_name=result.model_name,
            model_version=result.model_version,
            timings=rows.timings,
            lease_owner=None,
            lease_expires_at=None,
            rerun=False,
            completed_at=ts,
            updated_at=ts,
        )
    )
    return new_status


class StudyQueue:
    """Queue, claim, lease, complete, fail and recover studies.

    Parameters
    ----------
    db : Database
        The worklist database.
    wakeups : WakeUps
        The process's wake-ups.
    deliveries : Deliveries
        Where :meth:`complete_study` registers its output objects.
    max_attempts : int
        Claims a study may use before an expired lease (or a retried failure) fails it.
    """

    def __init__(
        self, db: Database, wakeups: WakeUps, deliveries: Deliveries, *, max_attempts: int = 3
    ) -> None:
        self._db = db
        self._wakeups = wakeups
        self._deliveries = deliveries
        self.max_attempts = int(max_attempts)

    # ------------------------------------------------------------------ wake-ups
    def waiter(self) -> Waiter:
        """A :class:`Waiter` woken when a study becomes claimable (any process on PostgreSQL)."""
        return self._wakeups.waiter(STUDY_QUEUED)

    def instance_waiter(self) -> Waiter:
        """A :class:`Waiter` woken when this process records a new instance (the scheduler)."""
        return self._wakeups.waiter(INSTANCE_RECEIVED)

    # ------------------------------------------------------------------ queueing
    def queue_stable_studies(self, stable_age: float, now: float | None = None) -> list[str]:
        """Queue ``receiving`` studies whose last instance arrived ``>= stable_age`` s ago.

        Returns
        -------
        list of str
            The Study Instance UIDs queued by this call.
        """
        ts = timestamp(now)
        studies = self._db.tables.studies
        cutoff = ts - float(stable_age)
        with self._db.write() as conn:
            uids = list(
                conn.execute(
                    select(studies.c.study_uid)
                    .where(studies.c.status == "receiving", studies.c.last_instance_at <= cutoff)
                    .order_by(studies.c.received_at, studies.c.id)
                    .with_for_update(skip_locked=True)
                ).scalars()
            )
            if uids:
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid.in_(uids), studies.c.status == "receiving")
                    .values(status="queued", queued_at=ts, updated_at=ts)
                )
                self._db.notify(conn, STUDY_QUEUED)
        if uids:
            self._wakeups.fire((STUDY_QUEUED,))
            logger.info("queued %d stable studies", len(uids))
        return uids

    def next_stable_in(self, stable_age: float, now: float | None = None) -> float | None:
        """Seconds until the next ``receiving`` study is stable (``0.0``: one is already).

        ``None`` when no study is receiving: the scheduler can wait for an instance wake-up.
        """
        ts = timestamp(now)
        studies = self._db.tables.studies
        with self._db.read() as conn:
            last = conn.execute(
                select(func.min(studies.c.last_instance_at)).where(studies.c.status == "receiving")
            ).scalar()
        return None if last is None else max(0.0, float(last) + float(stable_age) - ts)

    # ------------------------------------------------------------------ claims and leases
    def claim_study(
        self, worker_id: str, lease_seconds: float, now: float | None = None
    ) -> ClaimedStudy | None:
        """Claim the oldest queued study (FIFO by first arrival) with a lease.

        ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite.

        Parameters
        ----------
        worker_id : str
            Unique name of the claiming worker (e.g. ``host:pid/w0``).
        lease_seconds : float
            How long the lease lasts unless renewed.
        now : float, optional
            Current time (epoch seconds).

        Returns
        -------
        ClaimedStudy or None
            ``None`` when nothing is queued.
        """
        if not worker_id:
            raise WorklistError("worker_id must not be empty")
        if not lease_seconds > 0:
            raise WorklistError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        ts = timestamp(now)
        studies, instances = self._db.tables.studies, self._db.tables.instances
        with self._db.write() as conn:
            row = conn.execute(
                select(studies.c.study_uid, studies.c.attempts)
                .where(studies.c.status == "queued")
                .order_by(studies.c.received_at, studies.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            study_uid, attempts = str(row[0]), int(row[1]) + 1
            expires = ts + float(lease_seconds)
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(
                    status="processing",
                    attempts=attempts,
                    lease_owner=worker_id,
                    lease_expires_at=expires,
                    rerun=False,
                    updated_at=ts,
                )
            )
            inst = conn.execute(
                select(instances.c.sop_uid, instances.c.path)
                .where(instances.c.study_uid == study_uid)
                .order_by(instances.c.received_at, instances.c.sop_uid)
            ).all()
        logger.info("worker %s claimed study %s (attempt %d)", worker_id, study_uid, attempts)
        return ClaimedStudy(
            study_uid=study_uid,
            worker_id=worker_id,
            attempts=attempts,
            lease_expires_at=expires,
            instances=tuple((str(uid), Path(p)) for uid, p in inst),
        )

    # ------------------------------------------------------------------ outcomes
    def complete_study(
        self,
        study_uid: str,
        worker_id: str,
        result: StudyResult,
        now: float | None = None,
        *,
        deliveries: Sequence[DeliverySpec] = (),
    ) -> str:
        """Store a study's result and its deliveries, and finish it, in one transaction.

        Findings (probability, present, threshold, source image), priority score and level,
        model name and version, timings and per-image results replace any earlier result. Either
        the result and its deliveries are stored, or neither is (e.g. when the lease was lost).

        Parameters
        ----------
        study_uid, worker_id : str
            The study and the worker holding its lease.
        result : StudyResult
            What the pipeline found (``status`` ``done`` or ``not_eligible``).
        now : float, optional
            Current time (epoch seconds).
        deliveries : sequence of (sop_uid, path, destination)
            Output objects to send (idempotent on ``(sop_uid, destination)``).

        Returns
        -------
        str
            ``result.status``, or ``receiving`` when instances arrived during processing.

        Raises
        ------
        WorklistError
            If the worker no longer holds the lease, or the result is inconsistent.
        """
        _check_result(study_uid, result, deliveries)
        rows = _result_rows(study_uid, result)
        ts = timestamp(now)
        with self._db.write() as conn:
            held = _held(conn, self._db.tables.studies, study_uid, worker_id)
            _replace_results(conn, self._db.tables, study_uid, rows)
            for sop_uid, path, destination in deliveries:
                self._deliveries.insert(conn, study_uid, sop_uid, path, destination, ts)
            if deliveries:
                self._db.notify(conn, DELIVERY_DUE)
            new_status = _finish(conn, self._db.tables.studies, held, result, rows, ts)
        if deliveries:
            self._wakeups.fire((DELIVERY_DUE,))
        logger.info(
            "study %s %s (priority %.1f %s)",
            study_uid,
            new_status,
            rows.score,
            result.priority_level,
        )
        return new_status

    def fail_study(
        self,
        study_uid: str,
        worker_id: str,
        error: str,
        *,
        retry: bool = False,
        now: float | None = None,
    ) -> str:
        """Record a processing error.

        Parameters
        ----------
        retry : bool
            Put the study back in the queue when it has claims left (a transient error);
            otherwise it becomes ``failed`` at once.

        Returns
        -------
        str
            The new status (``failed``, ``queued`` or ``receiving`` if instances arrived).

        Raises
        ------
        WorklistError
            If the worker no longer holds the lease.
        """
        ts = timestamp(now)
        studies = self._db.tables.studies
        with self._db.write() as conn:
            held = _held(conn, self._db.tables.studies, study_uid, worker_id)
            if held.rerun:
                status = "receiving"
            elif retry and int(held.attempts) < self.max_attempts:
                status = "queued"
            else:
                status = "failed"
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(
                    status=status,
                    attempts=0 if held.rerun else held.attempts,
                    error=str(error),
                    lease_owner=None,
                    lease_expires_at=None,
                    rerun=False,
                    updated_at=ts,
                )
            )
            if status == "queued":
                self._db.notify(conn, STUDY_QUEUED)
        if status == "queued":
            self._wakeups.fire((STUDY_QUEUED,))
        logger.warning("study %s: %s -> %s", study_uid, error, status)
        return status


class Leases:
    """Renew leases (one study, or every lease of a worker process) and recover expired ones.

    Parameters
    ----------
    db : Database
        The worklist database.
    wakeups : WakeUps
        The process's wake-ups (a recovered study is claimable again).
    max_attempts : int
        Claims a study may use before an expired lease fails it.
    """

    def __init__(self, db: Database, wakeups: WakeUps, *, max_attempts: int = 3) -> None:
        self._db = db
        self._wakeups = wakeups
        self.max_attempts = int(max_attempts)

    def renew_lease(
        self, study_uid: str, worker_id: str, lease_seconds: float, now: float | None = None
    ) -> float:
        """Extend a held lease to ``now + lease_seconds``; returns the new expiry.

        Raises
        ------
        WorklistError
            If ``worker_id`` no longer holds the lease.
        """
        ts = timestamp(now)
        studies = self._db.tables.studies
        expires = ts + float(lease_seconds)
        with self._db.write() as conn:
            _held(conn, self._db.tables.studies, study_uid, worker_id)
            conn.execute(
                update(studies)
                .where(studies.c.study_uid == study_uid)
                .values(lease_expires_at=expires, updated_at=ts)
            )
        return expires

    def renew_leases(
        self, worker_ids: str | Sequence[str], lease_seconds: float, now: float | None = None
    ) -> list[str]:
        """Extend every lease held by ``worker_ids`` to ``now + lease_seconds``, in one statement.

        For one lease-renewal thread per worker process: pass the process's worker id, or the
        ids of all its worker threads. A lease that already expired and was recovered by another
        process is no longer held and is not renewed (the worker finds out when it completes).

        Returns
        -------
        list of str
            The Study Instance UIDs whose leases were renewed (sorted).
        """
        owners = [worker_ids] if isinstance(worker_ids, str) else list(worker_ids)
        if not owners or not all(owners):
            raise WorklistError("renew_leases needs at least one non-empty worker id")
        if not lease_seconds > 0:
            raise WorklistError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        ts = timestamp(now)
        studies = self._db.tables.studies
        with self._db.write() as conn:
            renewed = conn.execute(
                update(studies)
                .where(studies.c.status == "processing", studies.c.lease_owner.in_(owners))
                .values(lease_expires_at=ts + float(lease_seconds), updated_at=ts)
                .returning(studies.c.study_uid)
            ).scalars()
            return sorted(renewed)

    def recover_expired_leases(self, now: float | None = None) -> Recovered:
        """Return studies whose lease expired to ``queued`` (``failed`` after max_attempts)."""
        ts = timestamp(now)
        studies = self._db.tables.studies
        requeued: list[str] = []
        failed: list[str] = []
        with self._db.write() as conn:
            rows = conn.execute(
                select(studies.c.study_uid, studies.c.attempts, studies.c.lease_owner)
                .where(studies.c.status == "processing", studies.c.lease_expires_at < ts)
                .with_for_update(skip_locked=True)
            ).all()
            for uid, attempts, owner in rows:
                if int(attempts) >= self.max_attempts:
                    failed.append(uid)
                    values: dict[str, Any] = {
                        "status": "failed",
                        "error": f"lease of worker {owner} expired after {attempts} attempts",
                    }
                else:
                    requeued.append(uid)
                    values = {"status": "queued", "queued_at": ts}
                conn.execute(
                    update(studies)
                    .where(studies.c.study_uid == uid)
                    .values(lease_owner=None, lease_expires_at=None, updated_at=ts, **values)
                )
            if requeued:
                self._db.notify(conn, STUDY_QUEUED)
        if requeued:
            self._wakeups.fire((STUDY_QUEUED,))
        for uid in requeued:
            logger.warning("lease on study %s expired: queued again", uid)
        for uid in failed:
            logger.error("lease on study %s expired too often: failed", uid)
        return Recovered(tuple(requeued), tuple(failed))
