"""a log of the changes the gateway routes on, written by triggers

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 19:00:00.000000

Triggers rather than application code: every writer (the controller, the API, the boot
callback, an operator's SQL) is covered. On SQLite, ``batch_alter_table`` rebuilds a
table and drops its triggers: a later migration that rebuilds ``instances``,
``workloads``, ``tokens`` or ``decisions`` must create these again
(``tests/store/test_route_changes.py`` fails if it does not).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

#: Columns whose change alters a route (``gateway.routes.load_route_table`` reads them).
INSTANCE_COLUMNS = (
    "workload_id",
    "url",
    "engine_key",
    "ready_at",
    "drain_requested_at",
    "terminate_requested_at",
    "terminated_confirmed_at",
    "group_role",
    "engine_command",  # the LoRA adapters its engine loaded
)
WORKLOAD_COLUMNS = ("project", "slug", "spec", "deleted_at")

#: (trigger name, event, table, the workload id it logs; NULL: the keys).
TRIGGERS = (
    ("route_change_instance_insert", "INSERT", "instances", "NEW.workload_id"),
    (
        "route_change_instance_update",
        f"UPDATE OF {', '.join(INSTANCE_COLUMNS)}",
        "instances",
        "NEW.workload_id",
    ),
    ("route_change_instance_delete", "DELETE", "instances", "OLD.workload_id"),
    ("route_change_workload_insert", "INSERT", "workloads", "NEW.id"),
    (
        "route_change_workload_update",
        f"UPDATE OF {', '.join(WORKLOAD_COLUMNS)}",
        "workloads",
        "NEW.id",
    ),
    ("route_change_workload_delete", "DELETE", "workloads", "OLD.id"),
    ("route_change_decision_insert", "INSERT", "decisions", "NEW.workload_id"),
    ("route_change_token_insert", "INSERT", "tokens", "NULL"),
    ("route_change_token_update", "UPDATE", "tokens", "NULL"),
    ("route_change_token_delete", "DELETE", "tokens", "NULL"),
)


def upgrade() -> None:
    op.create_table(
        "route_changes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("workload_id", sa.Integer(), nullable=True),
        sqlite_autoincrement=True,  # ids never reused after pruning
    )
    postgres = op.get_bind().dialect.name == "postgresql"
    for name, event, table, workload_id in TRIGGERS:
        insert = f"INSERT INTO route_changes (workload_id) VALUES ({workload_id});"
        if postgres:
            op.execute(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN {insert} RETURN NULL; END $$"
            )
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {name}()"
            )
        else:
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW BEGIN {insert} END"
            )


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for name, _event, table, _workload_id in TRIGGERS:
        if postgres:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {name}()")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("route_changes")
