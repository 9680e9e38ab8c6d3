"""a spot reclaim time of its own: ``instances.reclaim_at``, no longer text in ``last_error``

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01 12:00:00.000000

A spot notice recorded the reclaim time its provider announced at the end of
``last_error`` (``spot notice: …; reclaim at 2026-12-01T01:00:00+00:00``, maybe followed
by ``; terminating: …``). The time moves to a nullable ``reclaim_at`` (timestamp with
time zone): each row whose ``last_error`` carries one has it parsed into the column and
the ``; reclaim at …`` part taken out of the text (what follows it is kept). A time that
does not parse, or carries no zone, is left in the text, as the old reader ignored it.
Down again, the time is written back into the text and the column dropped.

The column is added in place (``ADD COLUMN``), not by a table rebuild, so the triggers
of 0007, 0012 and 0015 stay; the rows rewritten move their ``revision`` (0015), so a
controller's next pass reads them again.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

import autoscaler.store.models

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | None = None
depends_on: str | None = None

RECLAIM_AT = "; reclaim at "
"""What preceded the reclaim time in a recorded spot notice."""

_instances = sa.table(
    "instances",
    sa.column("launch_id", sa.String()),
    sa.column("last_error", sa.Text()),
    sa.column("reclaim_at", autoscaler.store.models.UtcDateTime(timezone=True)),
)


def split_reclaim_at(last_error: str) -> tuple[str, datetime | None]:
    """``last_error`` without its reclaim time, and that time (aware); the text as it is
    and ``None`` where it carries no time that parses."""
    at = last_error.rfind(RECLAIM_AT)
    if at < 0:
        return last_error, None
    rest = last_error[at + len(RECLAIM_AT) :]
    text, sep, after = rest.partition(";")  # a later note may follow
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return last_error, None
    if when.tzinfo is None:
        return last_error, None
    return last_error[:at] + (sep + after if sep else ""), when


def upgrade() -> None:
    op.add_column(
        "instances",
        sa.Column("reclaim_at", autoscaler.store.models.UtcDateTime(timezone=True), nullable=True),
    )
    bind = op.get_bind()
    noted = bind.execute(
        sa.select(_instances.c.launch_id, _instances.c.last_error).where(
            _instances.c.last_error.contains(RECLAIM_AT, autoescape=True)
        )
    ).all()
    for launch_id, last_error in noted:
        text, when = split_reclaim_at(last_error)
        if when is None:
            continue
        bind.execute(
            sa.update(_instances)
            .where(_instances.c.launch_id == launch_id)
            .values(last_error=text, reclaim_at=when)
        )


def downgrade() -> None:
    bind = op.get_bind()
    timed = bind.execute(
        sa.select(_instances.c.launch_id, _instances.c.last_error, _instances.c.reclaim_at).where(
            _instances.c.reclaim_at.is_not(None)
        )
    ).all()
    for launch_id, last_error, when in timed:
        notice, sep, after = (last_error or "").partition("; terminating: ")
        text = f"{notice}{RECLAIM_AT}{when.isoformat()}" + (sep + after if sep else "")
        bind.execute(
            sa.update(_instances).where(_instances.c.launch_id == launch_id).values(last_error=text)
        )
    op.drop_column("instances", "reclaim_at")
