"""Statuses, row types and small helpers shared by the worklist modules."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from triage_core.errors import WorklistError

#: Study lifecycle states (DESIGN.md section 4).
STUDY_STATUSES: tuple[str, ...] = (
    "receiving",
    "queued",
    "processing",
    "done",
    "not_eligible",
    "failed",
)
#: Delivery states.
DELIVERY_STATUSES: tuple[str, ...] = ("pending", "sent", "failed")
#: Statuses after which a new instance re-opens the study.
REOPEN_STATUSES: tuple[str, ...] = ("done", "not_eligible", "failed")
#: Statuses a study stays in until new instances arrive or it is purged.
FINISHED_STATUSES: tuple[str, ...] = ("done", "not_eligible", "failed")


#: User names (access tokens, readers' verdicts): letters, digits and ``. _ @ -``, 1 to 64.
USER_NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def check_name(name: str) -> str:
    """``name`` unchanged, or :class:`WorklistError` saying what a user name may hold."""
    if not isinstance(name, str) or not USER_NAME_RE.fullmatch(name):
        raise WorklistError(
            f"user name {str(name)[:80]!r} must be 1-64 letters, digits or . _ @ - characters"
        )
    return name


def timestamp(now: float | None) -> float:
    """``now`` as a float, or the current time (epoch seconds) when ``None``."""
    return time.time() if now is None else float(now)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC string (``...Z``), ``None`` stays ``None``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def backoff_seconds(attempt: int, base: float = 30.0, cap: float = 3600.0) -> float:
    """Exponential backoff before retry number ``attempt`` (1-based): ``min(cap, base*2**(n-1))``.

    Parameters
    ----------
    attempt : int
        How many attempts have failed so far (>= 1; smaller values count as 1).
    base : float
        Delay after the first failure, in seconds (> 0).
    cap : float
        Largest delay, in seconds (>= base).

    Raises
    ------
    ValueError
        If ``base`` is not positive or ``cap < base``.
    """
    if not base > 0 or not cap >= base:
        raise ValueError(f"need 0 < base <= cap, got base={base!r}, cap={cap!r}")
    exponent = max(0, int(attempt) - 1)
    if exponent >= 63:
        return float(cap)
    return float(min(cap, base * (2**exponent)))


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, for :meth:`~triage_core.worklist.ingest.Ingest.record_instances`."""

    study_uid: str
    sop_uid: str
    path: str | Path
    series_uid: str = ""
    sop_class_uid: str = ""
    accession_hash: str = ""


@dataclass(frozen=True)
class ClaimedStudy:
    """A study a worker now holds a lease on.

    ``instances`` are ``(sop_instance_uid, path)`` pairs in arrival order, the input of
    ``triage_core.pipeline.triage_study``.
    """

    study_uid: str
    worker_id: str
    attempts: int
    lease_expires_at: float
    instances: tuple[tuple[str, Path], ...]


@dataclass(frozen=True)
class DeliveryRow:
    """One output object to send to one destination."""

    id: int
    study_uid: str
    sop_uid: str
    path: Path
    destination: str
    status: str
    attempts: int
    next_attempt_at: float
    last_error: str


@dataclass(frozen=True)
class Recovered:
    """What :meth:`~triage_core.worklist.queue.Leases.recover_expired_leases` did."""

    requeued: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
