"""index jobs on (batch_id, status): a batch's open lines are found without a scan

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 20:10:00.000000
"""

from __future__ import annotations

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # The pair serves lookups by batch_id alone too: it replaces that index.
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_batch_id")
        batch.create_index("ix_jobs_batch_id_status", ["batch_id", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_batch_id_status")
        batch.create_index("ix_jobs_batch_id", ["batch_id"], unique=False)
