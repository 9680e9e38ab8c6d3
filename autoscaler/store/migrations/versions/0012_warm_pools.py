"""warm pools: a replica parked (engine asleep or machine stopped) and resumed

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 22:00:00.000000

Facts only, as the other timestamps: ``park_requested_at`` (asked to sleep or stop),
``parked_at`` (the engine or the provider confirmed it), ``resumed_at`` (woken or started
again), the way it waits (``park_mode``), the prices the ledger needs for it
(``running_usd_per_hour`` while ``hourly_usd`` is a stopped machine's disks;
``stopped_usd_per_hour``: what it would cost stopped, ``NULL`` where it cannot stop) and
``prefill`` (launched to refill a warm pool). The route change log's instance update
trigger is created again with the park columns: a replica asked to park leaves the
routes at once.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | None = None
depends_on: str | None = None

_BEFORE = (
    "workload_id",
    "url",
    "engine_key",
    "ready_at",
    "drain_requested_at",
    "terminate_requested_at",
    "terminated_confirmed_at",
    "group_role",
    "engine_command",
)
#: Columns whose change alters a route: 0007's and the park facts.
INSTANCE_COLUMNS = (*_BEFORE, "park_requested_at", "parked_at", "resumed_at")
_TRIGGER = "route_change_instance_update"


def _create_trigger(columns: tuple[str, ...]) -> None:
    insert = "INSERT INTO route_changes (workload_id) VALUES (NEW.workload_id);"
    event = f"UPDATE OF {', '.join(columns)}"
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP TRIGGER IF EXISTS {_TRIGGER} ON instances")
        op.execute(
            f"CREATE OR REPLACE FUNCTION {_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN {insert} RETURN NULL; END $$"
        )
        op.execute(
            f"CREATE TRIGGER {_TRIGGER} AFTER {event} ON instances "
            f"FOR EACH ROW EXECUTE FUNCTION {_TRIGGER}()"
        )
    else:
        op.execute(f"DROP TRIGGER IF EXISTS {_TRIGGER}")
        op.execute(
            f"CREATE TRIGGER {_TRIGGER} AFTER {event} ON instances FOR EACH ROW BEGIN {insert} END"
        )


def upgrade() -> None:
    # ADD COLUMN only: SQLite alters the table in place (no rebuild, triggers kept).
    op.add_column("instances", sa.Column("park_mode", sa.String(length=16), nullable=True))
    for name in ("park_requested_at", "parked_at", "resumed_at"):
        op.add_column("instances", sa.Column(name, sa.DateTime(timezone=True), nullable=True))
    op.add_column("instances", sa.Column("running_usd_per_hour", sa.Float(), nullable=True))
    op.add_column("instances", sa.Column("stopped_usd_per_hour", sa.Float(), nullable=True))
    op.add_column(
        "instances",
        sa.Column("prefill", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    _create_trigger(INSTANCE_COLUMNS)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    _create_trigger(_BEFORE)  # it names the park columns: it goes back to 0007's first
    with op.batch_alter_table("instances") as batch:
        for name in (
            "prefill",
            "stopped_usd_per_hour",
            "running_usd_per_hour",
            "resumed_at",
            "parked_at",
            "park_requested_at",
            "park_mode",
        ):
            batch.drop_column(name)
    # SQLite rebuilt the table without its triggers: create 0007's again.
    if not postgres:
        for name, event in (
            ("route_change_instance_insert", "INSERT"),
            ("route_change_instance_delete", "DELETE"),
        ):
            row = "OLD" if event == "DELETE" else "NEW"
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON instances FOR EACH ROW BEGIN "
                f"INSERT INTO route_changes (workload_id) VALUES ({row}.workload_id); END"
            )
        _create_trigger(_BEFORE)
