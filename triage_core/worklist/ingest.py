"""Recording received instances: the C-STORE hot path (one short transaction per batch)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, case, literal, or_, select, update

from triage_core.uids import check_uid
from triage_core.worklist.database import Database
from triage_core.worklist.records import REOPEN_STATUSES, InstanceRecord, timestamp
from triage_core.worklist.wakeup import INSTANCE_RECEIVED, WakeUps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Statements:
    add_study: Any
    add_instance: Any
    touch_study: Any


def _statements(db: Database) -> _Statements:
    """The three statements of :meth:`Ingest.record_instances`, with bound parameters.

    Built once: building a statement per call (``insert(...).values(...)``) costs more than
    running it; these run as ``executemany`` over a whole batch.
    """
    studies = db.tables.studies
    ts: Any = bindparam("ts")
    add_study = (
        db.insert(studies)
        .values(
            study_uid=bindparam("study_uid"),
            status="receiving",
            reason="",
            error="",
            accession_hash=bindparam("accession_hash"),
            received_at=ts,
            last_instance_at=ts,
            updated_at=ts,
            attempts=0,
            rerun=False,
            model_name="",
            model_version="",
            timings="{}",
        )
        .on_conflict_do_nothing(index_elements=["study_uid"])
    )
    add_instance = (
        db.insert(db.tables.instances)
        .values(
            sop_uid=bindparam("sop_uid"),
            study_uid=bindparam("study_uid"),
            series_uid=bindparam("series_uid"),
            sop_class_uid=bindparam("sop_class_uid"),
            path=bindparam("path"),
            received_at=ts,
        )
        .on_conflict_do_nothing(index_elements=["sop_uid"])
    )
    status = studies.c.status
    # OR of equalities, not IN: an expanding IN cannot run as executemany
    reopen = or_(*(status == value for value in REOPEN_STATUSES))
    accession: Any = bindparam("accession_hash")
    touch_study = (
        update(studies)
        .where(studies.c.study_uid == bindparam("key"))
        .values(
            last_instance_at=ts,
            updated_at=ts,
            status=case((reopen, "receiving"), else_=status),
            attempts=case((reopen, 0), else_=studies.c.attempts),
            rerun=case((status == "processing", True), else_=studies.c.rerun),
            # an accession hash fills an empty one, never replaces a known one
            accession_hash=case(
                ((studies.c.accession_hash == "") & (accession != literal("")), accession),
                else_=studies.c.accession_hash,
            ),
        )
    )
    return _Statements(add_study, add_instance, touch_study)


class Ingest:
    """Records instances; a new instance opens, re-opens or flags its study.

    A new instance for a ``done``, ``not_eligible`` or ``failed`` study sends it back to
    ``receiving`` (attempts reset); for a ``processing`` study it sets a re-run flag so that
    completing it returns it to ``receiving``.
    """

    def __init__(self, db: Database, wakeups: WakeUps) -> None:
        self._db = db
        self._wakeups = wakeups
        self._statements = _statements(db)

    def record_instance(
        self,
        study_uid: str,
        sop_uid: str,
        path: str | Path,
        *,
        series_uid: str = "",
        sop_class_uid: str = "",
        accession_hash: str = "",
        now: float | None = None,
    ) -> bool:
        """Record one received instance (idempotent on the SOP Instance UID).

        Parameters
        ----------
        study_uid, sop_uid : str
            Study and SOP Instance UIDs (checked against the UID grammar).
        path : str or Path
            Where the instance is spooled.
        series_uid, sop_class_uid : str
            Optional, for display and eligibility summaries.
        accession_hash : str
            A hash of the accession number (:func:`triage_core.uids.hash_identifier`).
        now : float, optional
            Arrival time (epoch seconds); defaults to the current time.

        Returns
        -------
        bool
            ``True`` if the instance was new, ``False`` for a repeat.

        Raises
        ------
        InvalidUIDError
            For a UID that breaks the grammar.
        WorklistError
            When the database refuses the write.
        """
        record = InstanceRecord(study_uid, sop_uid, path, series_uid, sop_class_uid, accession_hash)
        return self.record_instances([record], now=now)[0]

    def known_instances(self, sop_uids: Sequence[str]) -> set[str]:
        """The SOP Instance UIDs among ``sop_uids`` that already have a row (storage recovery
        reads the headers of the others only)."""
        instances = self._db.tables.instances
        known: set[str] = set()
        with self._db.read() as conn:
            for start in range(0, len(sop_uids), 500):
                chunk = set(sop_uids[start : start + 500])
                query = select(instances.c.sop_uid).where(instances.c.sop_uid.in_(chunk))
                known.update(conn.execute(query).scalars())
        return known

    def record_instances(
        self, records: Sequence[InstanceRecord], now: float | None = None
    ) -> list[bool]:
        """Record several instances in one transaction (one commit); see :meth:`record_instance`.

        Returns
        -------
        list of bool
            Per record, whether it was new (a SOP UID repeated inside the batch is new once).
        """
        for rec in records:
            check_uid(rec.study_uid, "Study Instance UID")
            check_uid(rec.sop_uid, "SOP Instance UID")
            if rec.series_uid:
                check_uid(rec.series_uid, "Series Instance UID")
        if not records:
            return []
        ts = timestamp(now)
        instances = self._db.tables.instances
        out = [False] * len(records)
        # Rows are locked in one global order (study, then SOP UID) so that two concurrent
        # batches on PostgreSQL cannot deadlock on each other's study rows.
        order = sorted(
            range(len(records)), key=lambda k: (records[k].study_uid, records[k].sop_uid)
        )
        with self._db.write() as conn:
            known = set(
                conn.execute(
                    select(instances.c.sop_uid).where(
                        instances.c.sop_uid.in_({rec.sop_uid for rec in records})
                    )
                ).scalars()
            )
            fresh: list[InstanceRecord] = []
            accession: dict[str, str] = {}
            for index in order:
                rec = records[index]
                if rec.sop_uid in known:
                    logger.debug("instance %s already recorded", rec.sop_uid)
                    continue
                known.add(rec.sop_uid)  # a repeat inside the batch is new once
                out[index] = True
                fresh.append(rec)
                accession[rec.study_uid] = accession.get(rec.study_uid, "") or rec.accession_hash
            if fresh:
                self._write_fresh(conn, fresh, accession, ts)
        if any(out):
            self._wakeups.fire((INSTANCE_RECEIVED,))
        return out

    def _write_fresh(
        self, conn: Any, fresh: list[InstanceRecord], accession: dict[str, str], ts: float
    ) -> None:
        # executemany: one round of statements per batch, not per instance
        stmts = self._statements
        per_study = [{"study_uid": u, "accession_hash": h, "ts": ts} for u, h in accession.items()]
        conn.execute(stmts.add_study, per_study)
        conn.execute(
            stmts.add_instance,
            [
                {
                    "sop_uid": rec.sop_uid,
                    "study_uid": rec.study_uid,
                    "series_uid": rec.series_uid,
                    "sop_class_uid": rec.sop_class_uid,
                    "path": str(rec.path),
                    "ts": ts,
                }
                for rec in fresh
            ],
        )
        conn.execute(
            stmts.touch_study,
            [{"key": u, "accession_hash": h, "ts": ts} for u, h in accession.items()],
        )
