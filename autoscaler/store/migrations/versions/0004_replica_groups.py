"""replica groups: each member of a group is a ledger row naming its group and role

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 12:05:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("group_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("group_role", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("group_size", sa.Integer(), nullable=True))
        batch.create_index("ix_instances_group_id", ["group_id"])


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_index("ix_instances_group_id")
        batch.drop_column("group_size")
        batch.drop_column("group_role")
        batch.drop_column("group_id")
