"""The SQL priority worklist: studies, instances, results and deliveries (DESIGN.md section 4).

One :class:`Worklist` object per process wraps one SQLAlchemy 2 engine (created once, never per
request); every method opens its own short transaction. SQLite (WAL mode, the embedded default
under the storage folder) and PostgreSQL (``postgresql+psycopg://...``, the shared queue for
several machines) are supported.

The package, in the order data flows through it:

- :mod:`~triage_core.worklist.schema`: the tables, and the Alembic migrations (shipped in
  ``migrations/``) that :meth:`Worklist.create_all` runs at open;
- :mod:`~triage_core.worklist.database`: the engine, transactions, SQLite pragmas;
- :mod:`~triage_core.worklist.ingest`: recording received instances (the C-STORE hot path);
- :mod:`~triage_core.worklist.queue`: queue, claim, complete, fail studies (``StudyQueue``);
  renew and recover leases (``Leases``);
- :mod:`~triage_core.worklist.deliveries`: output objects to send, with retries;
- :mod:`~triage_core.worklist.wakeup`: waiting for work (threading events, PostgreSQL
  LISTEN/NOTIFY across processes) instead of polling;
- :mod:`~triage_core.worklist.queries`: the read side (CLI, HTTP API, web pages);
- :mod:`~triage_core.worklist.retention`: purge, deleting finished studies past retention;
- :mod:`~triage_core.worklist.feedback`: readers' verdicts (append-only) and their final verdict;
- :mod:`~triage_core.worklist.tokens`: named HTTP access tokens with a role (hashes only);
- :mod:`~triage_core.worklist.root`: :class:`Worklist`, which builds them on one engine.

Public API
----------
:class:`Worklist` holds what belongs to the whole: ``Worklist(url, *, max_attempts=3,
max_delivery_attempts=5, delivery_backoff_base=30.0, delivery_backoff_cap=3600.0,
sqlite_synchronous="FULL", busy_timeout_ms=30000, echo=False)``; ``Worklist.sqlite_url(
storage_dir)``; ``.create_all()`` (creates or upgrades the schema); ``.ping()``;
``.start_listening()``; ``.dispose()``; ``.engine``; ``.dialect``. Everything else is a method
of one of its parts:

- ``worklist.ingest`` (:class:`Ingest`): ``record_instance``, ``record_instances``,
  ``known_instances``;
- ``worklist.queue`` (:class:`StudyQueue`): ``queue_stable_studies``, ``next_stable_in``,
  ``claim_study``, ``complete_study``, ``fail_study``;
- ``worklist.leases`` (:class:`Leases`): ``renew_lease``, ``renew_leases`` (every lease of one
  or several worker ids, one statement), ``recover_expired_leases``;
- ``worklist.deliveries`` (:class:`Deliveries`): ``add``, ``due``, ``claim_due``,
  ``mark_sent``, ``mark_failed``, ``next_due_in``;
- wake-ups: ``worklist.queue.waiter()``, ``worklist.queue.instance_waiter()`` and
  ``worklist.deliveries.waiter()`` return a :class:`~triage_core.worklist.wakeup.Waiter` whose
  ``wait(timeout) -> bool`` blocks until work is announced; ``queue.next_stable_in(stable_age)``
  and ``deliveries.next_due_in()`` say how long a timer-driven loop may sleep;
- ``worklist.queries`` (:class:`WorklistQueries`): ``list_worklist``, ``study_detail``,
  ``counts_by_status``, ``delivery_counts_by_status``, ``instance_files``;
- ``worklist.retention`` (:class:`Retention`): ``purge``;
- ``worklist.feedback`` (:class:`Feedback`: ``add``, ``for_study``, ``final_verdicts``,
  ``labelled``, ``export_studies``) and ``worklist.tokens`` (:class:`Tokens`: ``add``,
  ``list``, ``revoke``, ``lookup``, ``role_of``, ``active_count``).

Time is stored as float seconds since the epoch (UTC); every method takes an optional ``now``
so that tests and replays are deterministic.

Importing this package loads neither SQLAlchemy nor Alembic (the CLI reads the constants
without them): the classes that need them are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from triage_core.uids import hash_identifier, is_valid_uid
from triage_core.worklist.records import (
    DELIVERY_STATUSES,
    STUDY_STATUSES,
    ClaimedStudy,
    DeliveryRow,
    InstanceRecord,
    Recovered,
    backoff_seconds,
)
from triage_core.worklist.wakeup import Waiter

if TYPE_CHECKING:
    from triage_core.worklist.deliveries import Deliveries
    from triage_core.worklist.feedback import Feedback
    from triage_core.worklist.ingest import Ingest
    from triage_core.worklist.queries import WorklistQueries
    from triage_core.worklist.queue import Leases, StudyQueue
    from triage_core.worklist.retention import Retention
    from triage_core.worklist.root import Worklist
    from triage_core.worklist.schema import HEAD_REVISION, SCHEMA_VERSION
    from triage_core.worklist.tokens import Tokens

__all__ = [
    "DELIVERY_STATUSES",
    "HEAD_REVISION",
    "SCHEMA_VERSION",
    "STUDY_STATUSES",
    "ClaimedStudy",
    "Deliveries",
    "DeliveryRow",
    "Feedback",
    "Ingest",
    "InstanceRecord",
    "Leases",
    "Recovered",
    "Retention",
    "StudyQueue",
    "Waiter",
    "Tokens",
    "Worklist",
    "WorklistQueries",
    "backoff_seconds",
    "hash_identifier",
    "is_valid_uid",
]

_LAZY = {
    "Worklist": "triage_core.worklist.root",
    "Ingest": "triage_core.worklist.ingest",
    "StudyQueue": "triage_core.worklist.queue",
    "Leases": "triage_core.worklist.queue",
    "Deliveries": "triage_core.worklist.deliveries",
    "WorklistQueries": "triage_core.worklist.queries",
    "Retention": "triage_core.worklist.retention",
    "Feedback": "triage_core.worklist.feedback",
    "Tokens": "triage_core.worklist.tokens",
    "SCHEMA_VERSION": "triage_core.worklist.schema",
    "HEAD_REVISION": "triage_core.worklist.schema",
}


def __getattr__(name: str) -> Any:
    """Import the SQLAlchemy-backed names on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
