"""Periodic jobs (APScheduler 3, ``BackgroundScheduler``): work that is due with time.

* :func:`queue_stable`: studies without new instances for ``stable_age`` seconds are queued
  (and the workers woken);
* :func:`recover_leases`: studies whose worker vanished go back to ``queued``, ``failed`` after
  ``max_attempts``;
* :func:`purge`: optional retention purge of finished studies.

``triage serve`` schedules all three, ``triage worker`` only the lease recovery (safe with
several processes). :class:`Jobs` is the component that runs the ones it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage_core.errors import WorklistError

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings
    from dicom_node.wakeup import Wakeups
    from triage_core.worklist import Worklist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """A function run every ``seconds``."""

    name: str
    run: Callable[[], Any]
    seconds: float


class Jobs:
    """The scheduler of a process, running the given :class:`Job` list."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs
        self._scheduler: Any = None

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        for job in self.jobs:
            scheduler.add_job(job.run, "interval", seconds=job.seconds, id=job.name, name=job.name)
        scheduler.start()
        self._scheduler = scheduler

    def stop(self, deadline: float) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None


def stable_job(settings: NodeSettings, worklist: Worklist, wakeups: Wakeups) -> Job:
    return Job(
        "stable studies",
        lambda: queue_stable(settings, worklist, wakeups),
        settings.scheduler_interval,
    )


def lease_job(settings: NodeSettings, worklist: Worklist, wakeups: Wakeups) -> Job:
    period = max(settings.scheduler_interval, min(5.0, settings.lease_seconds / 4))
    return Job("expired leases", lambda: recover_leases(settings, worklist, wakeups), period)


def purge_job(settings: NodeSettings, worklist: Worklist) -> Job:
    return Job("retention purge", lambda: purge(settings, worklist), 3600.0)


def queue_stable(settings: NodeSettings, worklist: Worklist, wakeups: Wakeups) -> list[str]:
    """Queue studies without new instances for ``stable_age`` seconds; wake the workers."""
    try:
        queued = worklist.queue_stable_studies(settings.stable_age)
    except WorklistError as exc:
        logger.error("stable-study detection failed: %s", exc)
        return []
    if queued:
        wakeups.studies.notify()
        for study_uid in queued:
            log_received(worklist, study_uid, settings.stable_age)
    return queued


def log_received(worklist: Worklist, study_uid: str, stable_age: float) -> None:
    """The ``queued`` stage: instances and how long they took to arrive."""
    try:
        detail = worklist.study_detail(study_uid) or {}
    except WorklistError as exc:
        logger.debug("study %s: no detail for the log: %s", study_uid, exc)
        detail = {}
    images = detail.get("images") or []
    times = sorted(str(i.get("received_at") or "") for i in images if i.get("received_at"))
    span = ""
    if len(times) >= 2:
        first, last = (
            datetime.fromisoformat(t.replace("Z", "+00:00")) for t in (times[0], times[-1])
        )
        span = f" over {(last - first).total_seconds():.1f} s"
    logger.info(
        "study %s stage=queued: %s instance(s) received%s, stable for %.1f s",
        study_uid,
        detail.get("num_instances", "?"),
        span,
        stable_age,
    )


def recover_leases(settings: NodeSettings, worklist: Worklist, wakeups: Wakeups) -> None:
    """Studies whose worker vanished go back to ``queued`` (or ``failed``); wake the workers."""
    try:
        recovered = worklist.recover_expired_leases()
    except WorklistError as exc:
        logger.error("lease recovery failed: %s", exc)
        return
    for study_uid in recovered.requeued:
        logger.warning("study %s stage=requeued (lease expired)", study_uid)
    for study_uid in recovered.failed:
        logger.error(
            "study %s stage=failed (lease expired %d times)", study_uid, settings.max_attempts
        )
    if recovered.requeued:
        wakeups.studies.notify()


def purge(settings: NodeSettings, worklist: Worklist) -> int:
    """Delete finished studies older than ``retention_days`` (rows, spool, outbox).

    Only files inside the storage folder are deleted, then their emptied study and series
    folders. Returns the number of files deleted.
    """
    if not settings.retention_days:
        return 0
    try:
        paths = worklist.purge(settings.retention_days * 86400.0)
    except WorklistError as exc:
        logger.error("retention purge failed: %s", exc)
        return 0
    root = settings.storage.resolve()
    keep = {root, root / "spool", root / "outbox", root / "quarantine"}
    removed = 0
    folders: set[Path] = set()
    for raw in paths:
        path = Path(raw).resolve()
        if root not in path.parents:
            logger.error("retention purge: %s is outside the storage folder, kept", path)
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("retention purge: cannot delete %s: %s", path, exc)
            continue
        removed += 1
        folders.update(p for p in path.parents if root in p.parents and p not in keep)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty (other studies' files) or already gone
            continue
    if removed:
        logger.info("retention purge removed %d file(s)", removed)
    return removed
