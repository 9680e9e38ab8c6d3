"""controller members and shard leases: several controllers share the workloads

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 21:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import autoscaler.store.models

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "controller_members",
        sa.Column("member_id", sa.String(length=128), nullable=False),
        sa.Column("started_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column(
            "heartbeat_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.Column("expires_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("member_id"),
    )
    op.create_table(
        "shard_leases",
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=True),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("acquired_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("expires_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("shard"),
    )


def downgrade() -> None:
    op.drop_table("shard_leases")
    op.drop_table("controller_members")
