"""Alembic migrations of the worklist (run by :func:`triage_core.worklist.schema.upgrade`)."""
