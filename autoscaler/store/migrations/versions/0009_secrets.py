"""stored secrets, sealed at rest (a workload's hf_token_secret names one)

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 19:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import autoscaler.store.models
import autoscaler.store.sealed

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("value", autoscaler.store.sealed.SealedText(), nullable=False),
        sa.Column("created_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("project", "name"),
    )


def downgrade() -> None:
    op.drop_table("secrets")
