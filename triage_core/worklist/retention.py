"""Retention: deleting finished studies once they are old enough (``purge``).

The only part of the read side's neighbourhood that writes: it removes a study's rows from every
table and hands back the files (spooled instances, output objects) for the caller to delete, so
that the database never points at a file that is gone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import delete, select

from triage_core.worklist.database import Database
from triage_core.worklist.records import FINISHED_STATUSES, timestamp

logger = logging.getLogger(__name__)


class Retention:
    """The retention sweep over one :class:`~triage_core.worklist.database.Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def purge(self, older_than_seconds: float, now: float | None = None) -> list[Path]:
        """Delete finished studies last updated more than ``older_than_seconds`` ago.

        Only ``done``, ``not_eligible`` and ``failed`` studies without a ``pending`` delivery
        are removed (with their instances, results, deliveries and readers' verdicts).

        Returns
        -------
        list of Path
            Spooled instance files and output objects the caller should now delete.
        """
        cutoff = timestamp(now) - float(older_than_seconds)
        t = self._db.tables
        s, d, i = t.studies, t.deliveries, t.instances
        with self._db.write() as conn:
            pending = select(d.c.study_uid).where(d.c.status == "pending")
            uids = list(
                conn.execute(
                    select(s.c.study_uid).where(
                        s.c.status.in_(FINISHED_STATUSES),
                        s.c.updated_at < cutoff,
                        s.c.study_uid.not_in(pending),
                    )
                ).scalars()
            )
            if not uids:
                return []
            paths = [
                Path(p)
                for p in conn.execute(select(i.c.path).where(i.c.study_uid.in_(uids))).scalars()
            ]
            paths += [
                Path(p)
                for p in conn.execute(select(d.c.path).where(d.c.study_uid.in_(uids))).scalars()
            ]
            for table in (t.verdicts, t.results, t.image_results, t.deliveries, t.instances, s):
                conn.execute(delete(table).where(table.c.study_uid.in_(uids)))
        logger.info("purged %d studies (%d files to delete)", len(uids), len(paths))
        return paths
