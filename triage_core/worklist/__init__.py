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
- :mod:`~triage_core.worklist.facade`: :class:`Worklist`, which assembles them.

Public API of :class:`Worklist` (stable; only additions from here on)
-------------------------------------------------------------------
- Construction and schema: ``Worklist(url, *, max_attempts=3, max_delivery_attempts=5,
  delivery_backoff_base=30.0, delivery_backoff_cap=3600.0, sqlite_synchronous="FULL",
  busy_timeout_ms=30000, echo=False)``; ``Worklist.sqlite_url(storage_dir)``; ``.create_all()``
  (creates or upgrades the schema); ``.ping()``; ``.dispose()``; ``.engine``; ``.dialect``.
- Ingest: ``record_instance(...) -> bool``, ``record_instances(records) -> list[bool]``.
- Study queue: ``queue_stable_studies``, ``claim_study``, ``renew_lease``, ``renew_leases``
  (every lease of one or several worker ids, one statement), ``complete_study``, ``fail_study``,
  ``recover_expired_leases``.
- Deliveries: ``add_delivery``, ``due_deliveries``, ``claim_due_deliveries``,
  ``mark_delivery_sent``, ``mark_delivery_failed``.
- Wake-ups: ``study_waiter()``, ``delivery_waiter()``, ``instance_waiter()`` return a
  :class:`~triage_core.worklist.wakeup.Waiter` whose ``wait(timeout) -> bool`` blocks until work
  is announced; ``worklist.queue.next_stable_in(stable_age)`` and
  ``worklist.deliveries.next_due_in()`` say how long a timer-driven loop may sleep.
- Queries: ``list_worklist``, ``study_detail``, ``counts_by_status``,
  ``delivery_counts_by_status``, ``purge``.
- Readers' verdicts and access tokens: ``worklist.feedback`` (:class:`Feedback`: ``add``,
  ``for_study``, ``final_verdicts``, ``labelled``, ``export_studies``) and ``worklist.tokens``
  (:class:`Tokens`: ``add``, ``list``, ``revoke``, ``lookup``, ``role_of``, ``active_count``).

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
    from triage_core.worklist.facade import Worklist
    from triage_core.worklist.queries import WorklistQueries
    from triage_core.worklist.queue import Leases, StudyQueue
    from triage_core.worklist.schema import HEAD_REVISION, SCHEMA_VERSION

__all__ = [
    "DELIVERY_STATUSES",
    "HEAD_REVISION",
    "SCHEMA_VERSION",
    "STUDY_STATUSES",
    "ClaimedStudy",
    "Deliveries",
    "DeliveryRow",
    "InstanceRecord",
    "Leases",
    "Recovered",
    "StudyQueue",
    "Waiter",
    "Worklist",
    "WorklistQueries",
    "backoff_seconds",
    "hash_identifier",
    "is_valid_uid",
]

_LAZY = {
    "Worklist": "triage_core.worklist.facade",
    "StudyQueue": "triage_core.worklist.queue",
    "Leases": "triage_core.worklist.queue",
    "Deliveries": "triage_core.worklist.deliveries",
    "WorklistQueries": "triage_core.worklist.queries",
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
