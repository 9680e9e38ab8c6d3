"""which engine serves each instance; the latest measurement per workload

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 08:15:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import autoscaler.store.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("engine", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("engine_reason", sa.Text(), nullable=True))
    op.create_table(
        "workload_signals",
        sa.Column("workload_id", sa.Integer(), nullable=False),
        sa.Column("at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["workload_id"], ["workloads.id"]),
        sa.PrimaryKeyConstraint("workload_id"),
    )


def downgrade() -> None:
    op.drop_table("workload_signals")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("engine_reason")
        batch.drop_column("engine")
