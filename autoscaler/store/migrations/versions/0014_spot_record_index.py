"""index a workload's spot machines by when they closed: the measured interruption rate
reads those closed within its window without a scan of the workload's history

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 05:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index(
        "ix_instances_spot_record",
        "instances",
        ["workload_id", "terminated_confirmed_at"],
        unique=False,
        sqlite_where=sa.text("spot"),
        postgresql_where=sa.text("spot"),
    )


def downgrade() -> None:
    op.drop_index("ix_instances_spot_record", table_name="instances")
