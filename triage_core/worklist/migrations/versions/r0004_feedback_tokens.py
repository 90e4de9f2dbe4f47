"""Readers' verdicts (append-only) and named access tokens with a role (issue 17).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "study_uid",
            sa.String(64),
            sa.ForeignKey("studies.study_uid", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("finding", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("at", sa.Double, nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("probability", sa.Double, nullable=True),
    )
    op.create_index("ix_verdicts_study_finding", "verdicts", ["study_uid", "finding"])
    op.create_table(
        "api_tokens",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("revoked_at", sa.Double, nullable=True),
    )
    op.execute("UPDATE worklist_meta SET value = '4' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_table("api_tokens")
    op.drop_index("ix_verdicts_study_finding", table_name="verdicts")
    op.drop_table("verdicts")
    op.execute("UPDATE worklist_meta SET value = '3' WHERE key = 'schema_version'")
