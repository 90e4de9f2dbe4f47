"""Out-of-distribution outcome per study: ``low_confidence`` and ``ood_score`` (issue 8).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # existing studies were scored without an OOD reference: not flagged, no score. Plain ADD
    # COLUMN (SQLite allows it with a constant default): a batch "move and copy" would drop the
    # studies table and, with foreign keys on, cascade-delete the deliveries and results.
    op.add_column(
        "studies",
        sa.Column("low_confidence", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.add_column("studies", sa.Column("ood_score", sa.Double, nullable=True))
    op.execute("UPDATE worklist_meta SET value = '3' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_column("studies", "ood_score")  # SQLite >= 3.35
    op.drop_column("studies", "low_confidence")
    op.execute("UPDATE worklist_meta SET value = '2' WHERE key = 'schema_version'")
