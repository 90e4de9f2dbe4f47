"""Work that becomes due with time.

* :class:`StableStudies` (``triage serve``): a thread that queues the studies without new
  instances for ``stable_age`` seconds (:func:`queue_stable`; the commit wakes the workers). It
  sleeps until the oldest receiving study is due, and a newly recorded instance only brings that
  time forward to ``stable_age`` from now: no polling, no query per instance.
* Periodic jobs (APScheduler 3, ``BackgroundScheduler``, component :class:`Jobs`):
  :func:`recover_leases` (studies whose worker vanished go back to ``queued``, ``failed`` after
  ``max_attempts``; ``serve`` and ``worker``, safe with several processes) and the optional
  retention :func:`purge` (``serve``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.stages.wakeup import ERROR_WAIT, WokenThread
from triage_core.errors import WorklistError

if TYPE_CHECKING:
    from dicom_node.settings import NodeSettings
    from dicom_node.stages.wakeup import Wakeups
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


def lease_job(settings: NodeSettings, worklist: Worklist) -> Job:
    period = max(settings.scheduler_interval, min(5.0, settings.lease_seconds / 4))
    return Job("expired leases", lambda: recover_leases(settings, worklist), period)


def purge_job(settings: NodeSettings, worklist: Worklist) -> Job:
    return Job("retention purge", lambda: purge(settings, worklist), 3600.0)


class StableStudies(WokenThread):
    """The thread that queues stable studies (see the module docstring)."""

    thread_name = "stable-studies"

    def __init__(self, settings: NodeSettings, worklist: Worklist, wakeups: Wakeups) -> None:
        super().__init__(wakeups)
        self.settings = settings
        self.worklist = worklist

    def _run(self) -> None:
        waiter = self.wakeups.instance_waiter()
        stable_age = self.settings.stable_age
        due = time.monotonic()  # look at once: studies received before a restart
        while not self._stop.is_set():
            if time.monotonic() >= due:
                if queue_stable(self.settings, self.worklist) is None:
                    due = time.monotonic() + ERROR_WAIT  # do not spin on a failing database
                else:
                    due = time.monotonic() + self.wakeups.bounded(self._next_stable_in())
            if waiter.wait(max(0.0, due - time.monotonic())):
                # a new instance: its study is stable stable_age from now at the earliest
                due = min(due, time.monotonic() + stable_age)

    def _next_stable_in(self) -> float | None:
        try:
            return self.worklist.queue.next_stable_in(self.settings.stable_age)
        except WorklistError as exc:
            logger.error("stable-study detection failed: %s", exc)
            return None


def queue_stable(settings: NodeSettings, worklist: Worklist) -> list[str] | None:
    """Queue studies without new instances for ``stable_age`` seconds (the commit wakes the
    workers); log each one's ``queued`` stage. ``None`` when the database failed."""
    try:
        queued = worklist.queue.queue_stable_studies(settings.stable_age)
    except WorklistError as exc:
        logger.error("stable-study detection failed: %s", exc)
        return None
    if queued:
        for study_uid in queued:
            log_received(worklist, study_uid, settings.stable_age)
    return queued


def log_received(worklist: Worklist, study_uid: str, stable_age: float) -> None:
    """The ``queued`` stage: instances and how long they took to arrive."""
    try:
        detail = worklist.queries.study_detail(study_uid) or {}
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


def recover_leases(settings: NodeSettings, worklist: Worklist) -> None:
    """Studies whose worker vanished go back to ``queued`` (or ``failed``; the commit wakes the
    workers)."""
    try:
        recovered = worklist.leases.recover_expired_leases()
    except WorklistError as exc:
        logger.error("lease recovery failed: %s", exc)
        return
    for study_uid in recovered.requeued:
        logger.warning("study %s stage=requeued (lease expired)", study_uid)
    for study_uid in recovered.failed:
        logger.error(
            "study %s stage=failed (lease expired %d times)", study_uid, settings.max_attempts
        )


def purge(settings: NodeSettings, worklist: Worklist) -> int:
    """Delete finished studies older than ``retention_days`` (rows, spool, outbox).

    Only files inside the storage folder are deleted, then their emptied study and series
    folders. Returns the number of files deleted.
    """
    if not settings.retention_days:
        return 0
    try:
        paths = worklist.retention.purge(settings.retention_days * 86400.0)
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
