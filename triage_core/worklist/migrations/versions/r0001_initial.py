"""The worklist as it was before Alembic (schema version 1).

Revision ID: 0001
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def _study_fk() -> sa.Column[str]:
    return sa.Column(
        "study_uid",
        sa.String(64),
        sa.ForeignKey("studies.study_uid", ondelete="CASCADE"),
        nullable=False,
    )


def upgrade() -> None:
    meta = op.create_table(
        "worklist_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("accession_hash", sa.String(64), nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("last_instance_at", sa.Double, nullable=False),
        sa.Column("queued_at", sa.Double, nullable=True),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("completed_at", sa.Double, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", sa.Double, nullable=True),
        sa.Column("rerun", sa.Boolean, nullable=False),
        sa.Column("priority_score", sa.Double, nullable=True),
        sa.Column("priority_level", sa.String(16), nullable=True),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("timings", sa.Text, nullable=False),
    )
    op.create_index("ix_studies_status_received", "studies", ["status", "received_at"])
    op.create_index("ix_studies_status_lease", "studies", ["status", "lease_expires_at"])
    op.create_table(
        "instances",
        sa.Column("sop_uid", sa.String(64), primary_key=True),
        _study_fk(),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
    )
    op.create_index("ix_instances_study", "instances", ["study_uid"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        _study_fk(),
        sa.Column("finding", sa.String(64), nullable=False),
        sa.Column("probability", sa.Double, nullable=False),
        sa.Column("present", sa.Boolean, nullable=False),
        sa.Column("threshold", sa.Double, nullable=False),
        sa.Column("source_uid", sa.String(256), nullable=False),
        sa.UniqueConstraint("study_uid", "finding", name="uq_results_study_finding"),
    )
    op.create_table(
        "image_results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        _study_fk(),
        sa.Column("uid", sa.String(256), nullable=False),
        sa.Column("eligible", sa.Boolean, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("probabilities", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.UniqueConstraint("study_uid", "uid", name="uq_image_results_study_uid"),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        _study_fk(),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("destination", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("last_error", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("sent_at", sa.Double, nullable=True),
        sa.UniqueConstraint("sop_uid", "destination", name="uq_deliveries_sop_destination"),
    )
    op.create_index("ix_deliveries_status_next", "deliveries", ["status", "next_attempt_at"])
    op.create_index("ix_deliveries_study", "deliveries", ["study_uid"])
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])


def downgrade() -> None:
    for table in ("deliveries", "image_results", "results", "instances", "studies"):
        op.drop_table(table)
    op.drop_table("worklist_meta")
