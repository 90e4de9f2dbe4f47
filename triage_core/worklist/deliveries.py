"""Deliveries: one row per output object and destination, retried with backoff."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select, update

from triage_core.errors import WorklistError
from triage_core.uids import check_uid
from triage_core.worklist.database import Database
from triage_core.worklist.records import DeliveryRow, backoff_seconds, timestamp
from triage_core.worklist.wakeup import DELIVERY_DUE, Waiter, WakeUps

logger = logging.getLogger(__name__)


def _row(row: Any) -> DeliveryRow:
    return DeliveryRow(
        id=int(row.id),
        study_uid=row.study_uid,
        sop_uid=row.sop_uid,
        path=Path(row.path),
        destination=row.destination,
        status=row.status,
        attempts=int(row.attempts),
        next_attempt_at=float(row.next_attempt_at),
        last_error=row.last_error,
    )


class Deliveries:
    """Register, reserve and settle deliveries; wake the delivery thread when one is due.

    Parameters
    ----------
    db : Database
        The worklist database.
    wakeups : WakeUps
        The process's wake-ups (:data:`~triage_core.worklist.wakeup.DELIVERY_DUE` channel).
    max_attempts : int
        Failed sends after which a delivery is ``failed``.
    backoff_base, backoff_cap : float
        Default retry delay after a failed send: :func:`backoff_seconds`.
    """

    def __init__(
        self,
        db: Database,
        wakeups: WakeUps,
        *,
        max_attempts: int = 5,
        backoff_base: float = 30.0,
        backoff_cap: float = 3600.0,
    ) -> None:
        self._db = db
        self._wakeups = wakeups
        self.max_attempts = int(max_attempts)
        self.backoff_base = float(backoff_base)
        self.backoff_cap = float(backoff_cap)

    def waiter(self) -> Waiter:
        """A :class:`Waiter` woken when a delivery becomes due (any process on PostgreSQL)."""
        return self._wakeups.waiter(DELIVERY_DUE)

    def add(
        self,
        study_uid: str,
        sop_uid: str,
        path: str | Path,
        destination: str,
        now: float | None = None,
    ) -> int:
        """Register an output object to send to ``destination`` (e.g. ``AE@host:port``).

        Idempotent on ``(sop_uid, destination)``: a repeat returns the existing id.
        """
        check_uid(sop_uid, "SOP Instance UID")
        if not destination:
            raise WorklistError("destination must not be empty")
        ts = timestamp(now)
        with self._db.write() as conn:
            delivery_id = self.insert(conn, study_uid, sop_uid, path, destination, ts)
            self._db.notify(conn, DELIVERY_DUE)
        self._wakeups.fire((DELIVERY_DUE,))
        return delivery_id

    def insert(
        self,
        conn: Connection,
        study_uid: str,
        sop_uid: str,
        path: str | Path,
        destination: str,
        ts: float,
    ) -> int:
        """Insert one pending delivery in the caller's transaction; returns its id.

        The caller announces it (``NOTIFY`` in the transaction, :meth:`WakeUps.fire` after).
        """
        d = self._db.tables.deliveries
        conn.execute(
            self._db.insert(d)
            .values(
                study_uid=study_uid,
                sop_uid=sop_uid,
                path=str(path),
                destination=destination,
                status="pending",
                attempts=0,
                next_attempt_at=ts,
                last_error="",
                created_at=ts,
                updated_at=ts,
            )
            .on_conflict_do_nothing(index_elements=["sop_uid", "destination"])
        )
        found = conn.execute(
            select(d.c.id).where(d.c.sop_uid == sop_uid, d.c.destination == destination)
        ).scalar_one()
        return int(found)

    def due(self, now: float | None = None, limit: int = 100) -> list[DeliveryRow]:
        """Pending deliveries whose ``next_attempt_at <= now``, oldest first."""
        ts = timestamp(now)
        d = self._db.tables.deliveries
        with self._db.read() as conn:
            rows = conn.execute(
                select(d)
                .where(d.c.status == "pending", d.c.next_attempt_at <= ts)
                .order_by(d.c.next_attempt_at, d.c.id)
                .limit(int(limit))
            ).all()
        return [_row(r) for r in rows]

    def next_due_in(self, now: float | None = None) -> float | None:
        """Seconds until the earliest pending delivery is due (``0.0`` if one is due now).

        ``None`` when nothing is pending: the delivery thread can then wait for a wake-up
        with only its fallback timeout.
        """
        ts = timestamp(now)
        d = self._db.tables.deliveries
        with self._db.read() as conn:
            first = conn.execute(
                select(func.min(d.c.next_attempt_at)).where(d.c.status == "pending")
            ).scalar()
        return None if first is None else max(0.0, float(first) - ts)

    def claim_due(
        self, lease_seconds: float, now: float | None = None, limit: int = 100
    ) -> list[DeliveryRow]:
        """Like :meth:`due`, but reserve the rows for ``lease_seconds``.

        Their ``next_attempt_at`` moves to ``now + lease_seconds`` in the same transaction, so
        another sender (thread or machine) does not pick them up meanwhile; a sender that dies
        simply lets them become due again.
        """
        ts = timestamp(now)
        d = self._db.tables.deliveries
        with self._db.write() as conn:
            rows = conn.execute(
                select(d)
                .where(d.c.status == "pending", d.c.next_attempt_at <= ts)
                .order_by(d.c.next_attempt_at, d.c.id)
                .limit(int(limit))
                .with_for_update(skip_locked=True)
            ).all()
            if rows:
                conn.execute(
                    update(d)
                    .where(d.c.id.in_([r.id for r in rows]))
                    .values(next_attempt_at=ts + float(lease_seconds), updated_at=ts)
                )
        return [_row(r) for r in rows]

    def mark_sent(self, delivery_id: int, now: float | None = None) -> None:
        """Mark a delivery ``sent``."""
        ts = timestamp(now)
        d = self._db.tables.deliveries
        with self._db.write() as conn:
            res = conn.execute(
                update(d)
                .where(d.c.id == int(delivery_id))
                .values(status="sent", sent_at=ts, updated_at=ts, attempts=d.c.attempts + 1)
            )
            if res.rowcount != 1:
                raise WorklistError(f"unknown delivery {delivery_id}")

    def mark_failed(
        self,
        delivery_id: int,
        error: str,
        retry_in_seconds: float | None = None,
        *,
        permanent: bool = False,
        now: float | None = None,
    ) -> str:
        """Record a failed send.

        Parameters
        ----------
        delivery_id : int
            The delivery.
        error : str
            What went wrong (kept as ``last_error``).
        retry_in_seconds : float, optional
            Delay before the next attempt; default :func:`backoff_seconds` of the attempt count
            with the constructor's base and cap.
        permanent : bool
            Do not retry (e.g. the destination refused the object for good).

        Returns
        -------
        str
            ``pending`` (will be retried) or ``failed``.
        """
        ts = timestamp(now)
        d = self._db.tables.deliveries
        with self._db.write() as conn:
            row = conn.execute(
                select(d.c.attempts).where(d.c.id == int(delivery_id)).with_for_update()
            ).first()
            if row is None:
                raise WorklistError(f"unknown delivery {delivery_id}")
            attempts = int(row.attempts) + 1
            status, delay = "failed", 0.0
            if not permanent and attempts < self.max_attempts:
                status = "pending"
                delay = (
                    backoff_seconds(attempts, self.backoff_base, self.backoff_cap)
                    if retry_in_seconds is None
                    else max(0.0, float(retry_in_seconds))
                )
            conn.execute(
                update(d)
                .where(d.c.id == int(delivery_id))
                .values(
                    status=status,
                    attempts=attempts,
                    last_error=str(error),
                    next_attempt_at=ts + delay,
                    updated_at=ts,
                )
            )
            due_now = status == "pending" and delay == 0.0
            if due_now:
                self._db.notify(conn, DELIVERY_DUE)
        if due_now:
            self._wakeups.fire((DELIVERY_DUE,))
        logger.warning(
            "delivery %s attempt %d failed (%s): %s", delivery_id, attempts, status, error
        )
        return status
