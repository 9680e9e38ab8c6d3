"""a revision on every workload and ledger row, set by triggers: the controller reads
only the rows written since its last pass (``reconcile.fleet``)

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 07:00:00.000000

Triggers rather than application code: every writer (the controller, the API, the boot
callback, the gateway's request stamps, an operator's SQL) moves it.

* PostgreSQL: the writing transaction's id (``txid_current()``, 64 bits, never
  wrapping). Transactions commit out of the order of their ids; the reader's next read
  takes the revisions at or above its snapshot's ``xmax`` and those of the
  transactions the snapshot shows in progress (every other one below ``xmax`` had
  ended when it read), so a row committed late by an older transaction is still read
  (``reconcile.fleet``).
* SQLite: one counter (``fleet_revision``), moved by each row written. SQLite has one
  writer at a time, so revisions are committed in their order.

Rows written before this migration have revision 0: the controller's first pass reads
the whole fleet. The columns are added in place (``ADD COLUMN``), not by a table
rebuild, so the route-change triggers of 0007 stay.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | None = None
depends_on: str | None = None

#: (table, the expression naming the written row in the table's ``WHERE``).
TABLES = (("workloads", "id = NEW.id"), ("instances", "launch_id = NEW.launch_id"))


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, _ in TABLES:
        op.add_column(
            table,
            sa.Column("revision", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        )
        op.create_index(f"ix_{table}_revision", table, ["revision"])
    if postgres:
        op.execute(
            "CREATE FUNCTION fleet_revision() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN NEW.revision := txid_current(); RETURN NEW; END $$"
        )
        for table, _ in TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_revision BEFORE INSERT OR UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION fleet_revision()"
            )
        return
    op.execute(
        "CREATE TABLE fleet_revision (id INTEGER PRIMARY KEY CHECK (id = 1), "
        "value INTEGER NOT NULL)"
    )
    op.execute("INSERT INTO fleet_revision (id, value) VALUES (1, 0)")
    for table, where in TABLES:
        # Its own UPDATE of the row does not fire it again (SQLite's recursive triggers
        # are off), and it names only ``revision``: the route-change triggers, which are
        # ``UPDATE OF`` other columns, do not fire on it.
        body = (
            "UPDATE fleet_revision SET value = value + 1 WHERE id = 1; "
            f"UPDATE {table} SET revision = (SELECT value FROM fleet_revision WHERE id = 1) "
            f"WHERE {where}; "
        )
        for event in ("INSERT", "UPDATE"):
            op.execute(
                f"CREATE TRIGGER {table}_revision_{event.lower()} AFTER {event} ON {table} "
                f"FOR EACH ROW BEGIN {body}END"
            )


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for table, _ in TABLES:
        if postgres:
            op.execute(f"DROP TRIGGER {table}_revision ON {table}")
        else:
            for event in ("insert", "update"):
                op.execute(f"DROP TRIGGER {table}_revision_{event}")
        op.drop_index(f"ix_{table}_revision", table_name=table)
    if postgres:
        op.execute("DROP FUNCTION fleet_revision()")
    else:
        op.execute("DROP TABLE fleet_revision")
    for table, _ in TABLES:
        op.drop_column(table, "revision")
