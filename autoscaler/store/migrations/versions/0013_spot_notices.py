"""spot notices: interruption warnings kept for the controller that owns the instance

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 01:00:00.000000

With sharding, a provider's notice queue (EC2 interruption warnings through SQS) is read
by every controller and each message goes to one of them: the one that reads a warning
stores it here and the one whose shard holds the instance acts on it and deletes it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import autoscaler.store.models

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "spot_notices",
        sa.Column("instance_id", sa.String(length=128), nullable=False),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("launch_id", sa.String(length=64), nullable=False),
        sa.Column("zone", sa.String(length=64), nullable=False),
        sa.Column("instance_type", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("noticed_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column(
            "received_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=False
        ),
        sa.PrimaryKeyConstraint("instance_id"),
    )


def downgrade() -> None:
    op.drop_table("spot_notices")
