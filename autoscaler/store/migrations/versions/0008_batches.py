"""the OpenAI Files and Batches API: files, batches, and a job's batch line

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 19:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import autoscaler.store.models

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None

Stamp = autoscaler.store.models.UtcDateTime


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("workload_slug", sa.String(length=63), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", Stamp(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("files") as batch:
        batch.create_index(batch.f("ix_files_workload_slug"), ["workload_slug"], unique=False)
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("project", sa.String(length=63), nullable=False),
        sa.Column("workload_slug", sa.String(length=63), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("input_file_id", sa.String(length=40), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("user_metadata", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("completed", sa.Integer(), nullable=True),
        sa.Column("failed", sa.Integer(), nullable=True),
        sa.Column("output_file_id", sa.String(length=40), nullable=True),
        sa.Column("error_file_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", Stamp(timezone=True), nullable=False),
        sa.Column("in_progress_at", Stamp(timezone=True), nullable=True),
        sa.Column("expires_at", Stamp(timezone=True), nullable=False),
        sa.Column("cancelling_at", Stamp(timezone=True), nullable=True),
        sa.Column("finalizing_at", Stamp(timezone=True), nullable=True),
        sa.Column("completed_at", Stamp(timezone=True), nullable=True),
        sa.Column("expired_at", Stamp(timezone=True), nullable=True),
        sa.Column("cancelled_at", Stamp(timezone=True), nullable=True),
        sa.Column("failed_at", Stamp(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("batches") as batch:
        batch.create_index(batch.f("ix_batches_workload_slug"), ["workload_slug"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("custom_id", sa.Text(), nullable=True))
        batch.add_column(sa.Column("batch_line", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.create_index(batch.f("ix_jobs_batch_id"), ["batch_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(batch.f("ix_jobs_batch_id"))
        batch.drop_column("attempts")
        batch.drop_column("batch_line")
        batch.drop_column("custom_id")
        batch.drop_column("batch_id")
    with op.batch_alter_table("batches") as batch:
        batch.drop_index(batch.f("ix_batches_workload_slug"))
    op.drop_table("batches")
    with op.batch_alter_table("files") as batch:
        batch.drop_index(batch.f("ix_files_workload_slug"))
    op.drop_table("files")
