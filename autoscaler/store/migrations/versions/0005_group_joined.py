"""replica groups: when a worker's startup script reported its role started (joined)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 15:35:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import autoscaler.store.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(
            sa.Column(
                "joined_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("joined_at")
