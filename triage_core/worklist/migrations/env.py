"""Alembic environment of the worklist: migrate the connection the worklist hands over.

No engine, no URL, no logging setup here: :func:`triage_core.worklist.schema.upgrade` opens the
transaction (and takes the lock) and passes its connection in ``config.attributes``.
"""

from __future__ import annotations

from alembic import context

from triage_core.worklist.schema import build_tables

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=build_tables().metadata)
with context.begin_transaction():
    context.run_migrations()
