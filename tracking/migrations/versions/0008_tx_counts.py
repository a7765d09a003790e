"""Pre-aggregated transaction counts: the summary report at any size.

Revision ID: 0008
Revises: 0007

* ``tx_count``: how many transactions of a process created in one UTC hour are in each state
  (``created_hour``: the hour's start). Filled from ``tx_process`` here, then kept by
  triggers on ``tx_process`` in the same database transaction as every insert, change of
  state (or of process or creation time) and delete: no code path can leave it behind.
* SQLite has one writer at a time: its triggers add to ``tx_count`` directly.
* PostgreSQL: concurrent writers would queue on the current hour's few rows (and deadlock
  over them, each multi-row batch taking them in its own order). Its trigger appends to
  ``tx_count_delta`` instead; ``tracking.store.counts.fold`` moves the deltas into
  ``tx_count``, one folder at a time. Reports add up both. A TRUNCATE of ``tx_process``
  (which fires no row trigger) empties both.
* Hours are UTC on both: ``strftime`` of the naive UTC text SQLite stores (in its format, so
  that it compares with the other timestamps), ``date_trunc(..., 'UTC')`` on PostgreSQL.

Upgrading counts the transactions as they are: run it with no worker writing.
"""

import sqlalchemy as sa
from alembic import op

import tracking.models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_SQLITE_HOUR = "strftime('%Y-%m-%d %H:00:00.000000', {}.created_at)"
_SQLITE_ADD = """INSERT INTO tx_count (process_code, created_hour, state, n)
     VALUES (NEW.process_code, {hour}, NEW.state, 1)
     ON CONFLICT (process_code, created_hour, state) DO UPDATE SET n = n + 1;""".format(
    hour=_SQLITE_HOUR.format("NEW"))
_SQLITE_TAKE = """UPDATE tx_count SET n = n - 1
      WHERE process_code = OLD.process_code AND created_hour = {hour}
        AND state = OLD.state;""".format(hour=_SQLITE_HOUR.format("OLD"))
_CHANGED = ("OLD.state IS NOT NEW.state OR OLD.process_code IS NOT NEW.process_code "
            "OR OLD.created_at IS NOT NEW.created_at")
_SQLITE_TRIGGERS = [
    f"CREATE TRIGGER tx_count_insert AFTER INSERT ON tx_process BEGIN {_SQLITE_ADD} END",
    f"CREATE TRIGGER tx_count_update AFTER UPDATE OF state, process_code, created_at "
    f"ON tx_process WHEN {_CHANGED} BEGIN {_SQLITE_TAKE} {_SQLITE_ADD} END",
    f"CREATE TRIGGER tx_count_delete AFTER DELETE ON tx_process BEGIN {_SQLITE_TAKE} END",
]
_PG_FUNCTION = """CREATE FUNCTION tx_count_delta() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP <> 'INSERT' THEN
    INSERT INTO tx_count_delta (process_code, created_hour, state, n)
    VALUES (OLD.process_code, date_trunc('hour', OLD.created_at, 'UTC'), OLD.state, -1);
  END IF;
  IF TG_OP <> 'DELETE' THEN
    INSERT INTO tx_count_delta (process_code, created_hour, state, n)
    VALUES (NEW.process_code, date_trunc('hour', NEW.created_at, 'UTC'), NEW.state, 1);
  END IF;
  RETURN NULL;
END $$"""
# TRUNCATE fires no row trigger: emptying tx_process empties the counts too.
_PG_TRUNCATE_FUNCTION = """CREATE FUNCTION tx_count_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM tx_count;
  DELETE FROM tx_count_delta;
  RETURN NULL;
END $$"""
_PG_TRIGGERS = [
    "CREATE TRIGGER tx_count_truncate AFTER TRUNCATE ON tx_process "
    "FOR EACH STATEMENT EXECUTE FUNCTION tx_count_truncate()",
    "CREATE TRIGGER tx_count_insert_delete AFTER INSERT OR DELETE ON tx_process "
    "FOR EACH ROW EXECUTE FUNCTION tx_count_delta()",
    "CREATE TRIGGER tx_count_update AFTER UPDATE OF state, process_code, created_at "
    "ON tx_process FOR EACH ROW WHEN ("
    + _CHANGED.replace("IS NOT", "IS DISTINCT FROM") + ") EXECUTE FUNCTION tx_count_delta()",
]


def upgrade() -> None:
    state = tracking.models._enum(tracking.models.TxState)
    op.create_table(
        "tx_count",
        sa.Column("process_code", sa.String(length=64), nullable=False),
        sa.Column("created_hour", tracking.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("state", state, nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("process_code", "created_hour", "state"),
    )
    op.create_index("ix_tx_count_hour", "tx_count", ["created_hour"])
    op.create_table(
        "tx_count_delta",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("process_code", sa.String(length=64), nullable=False),
        sa.Column("created_hour", tracking.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("state", state, nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    sqlite = op.get_bind().dialect.name == "sqlite"
    hour = _SQLITE_HOUR.format("tx_process") if sqlite else (
        "date_trunc('hour', created_at, 'UTC')")
    op.execute(
        f"INSERT INTO tx_count (process_code, created_hour, state, n) "
        f"SELECT process_code, {hour}, state, count(*) FROM tx_process "
        f"GROUP BY process_code, {hour}, state"
    )
    if sqlite:
        for trigger in _SQLITE_TRIGGERS:
            op.execute(trigger)
    else:
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRUNCATE_FUNCTION)
        for trigger in _PG_TRIGGERS:
            op.execute(trigger)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in ("tx_count_insert", "tx_count_update", "tx_count_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    else:
        op.execute("DROP TRIGGER IF EXISTS tx_count_insert_delete ON tx_process")
        op.execute("DROP TRIGGER IF EXISTS tx_count_update ON tx_process")
        op.execute("DROP TRIGGER IF EXISTS tx_count_truncate ON tx_process")
        op.execute("DROP FUNCTION IF EXISTS tx_count_delta()")
        op.execute("DROP FUNCTION IF EXISTS tx_count_truncate()")
    op.drop_table("tx_count_delta")
    op.drop_index("ix_tx_count_hour", table_name="tx_count")
    op.drop_table("tx_count")
