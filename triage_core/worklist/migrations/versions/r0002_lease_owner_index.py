"""Index studies by lease owner: one statement renews every lease of a worker process.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_studies_lease_owner", "studies", ["lease_owner"])
    # cxr-triage from before Alembic checks this row and refuses anything but "1"
    op.execute("UPDATE worklist_meta SET value = '2' WHERE key = 'schema_version'")


def downgrade() -> None:
    op.drop_index("ix_studies_lease_owner", table_name="studies")
    op.execute("UPDATE worklist_meta SET value = '1' WHERE key = 'schema_version'")
