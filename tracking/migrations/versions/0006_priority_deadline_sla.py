"""Priority, defer and deadline per transaction, SLA per process, sessions per platform.

Revision ID: 0006
Revises: 0005

* ``tx_process``: ``priority`` (default 0), ``not_before``, ``deadline`` and ``due_at`` (the
  earlier of the deadline and ``created_at`` + the process's SLA, fixed at intake);
  ``ix_tx_process_due`` (open transactions by ``due_at``: the overdue report).
* ``tx_stage``: ``priority`` and ``due_at``, always their transaction's, so claims need no
  join. ``ix_tx_stage_runnable`` is rebuilt as (process, platform, stage, priority DESC,
  next_attempt_at, id): higher priority first, then oldest due. ``ix_tx_stage_overdue``
  (process, platform, stage, due_at, next_attempt_at, id) over the stages with a due time:
  a claim takes the overdue ones first.
* ``tx_catalog_process.sla_seconds`` (``Process(sla=...)``) and
  ``tx_catalog_platform.concurrency`` (``Platform(concurrency=N)``).
* Views ``v_overdue`` (every waiting transaction past its due time, with the stage it waits
  at) and ``v_sla_daily`` (per process and creation day: finished within the due time,
  late, open and overdue).

Plain ADD COLUMN and CREATE INDEX (no batch mode): SQLite rebuilds no table, so the views of
0002 stay. Existing rows get priority 0 and no due time.
"""

import sqlalchemy as sa
from alembic import op

import tracking.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

RUNNABLE = "next_attempt_at IS NOT NULL"
OVERDUE_STAGES = "next_attempt_at IS NOT NULL AND due_at IS NOT NULL"
OPEN_DUE = "finished_at IS NULL AND due_at IS NOT NULL"


def _where(text: str) -> dict:
    return {"sqlite_where": sa.text(text), "postgresql_where": sa.text(text)}


def _dialect_sql(dialect: str) -> dict[str, str]:
    """SQL fragments that differ between PostgreSQL and SQLite (all in UTC), as in 0002."""
    if dialect == "postgresql":
        return {
            "day": "CAST({col} AT TIME ZONE 'UTC' AS DATE)",
            "now": "CURRENT_TIMESTAMP",
            "age": "CAST(EXTRACT(EPOCH FROM (CURRENT_TIMESTAMP - {col})) AS DOUBLE PRECISION)",
            "ratio": "CAST({num} AS DOUBLE PRECISION) / {den}",
        }
    return {
        "day": "date({col})",
        # The tables store UTC text 'YYYY-MM-DD HH:MM:SS.ffffff': compared as text.
        "now": "strftime('%Y-%m-%d %H:%M:%f', 'now')",
        "age": "ROUND((julianday('now') - julianday({col})) * 86400.0, 3)",
        "ratio": "CAST({num} AS REAL) / {den}",
    }


def _views(dialect: str) -> dict[str, str]:
    sql = _dialect_sql(dialect)
    day, now, age = sql["day"], sql["now"], sql["age"]
    finished = "SUM(CASE WHEN finished_at IS NOT NULL THEN 1 ELSE 0 END)"
    within = "SUM(CASE WHEN finished_at IS NOT NULL AND finished_at <= due_at THEN 1 ELSE 0 END)"
    return {
        "v_overdue": f"""
            SELECT p.uuid, p.process_code, p.business_key, p.state AS tx_state, p.priority,
                   p.deadline, p.due_at,
                   s.platform, s.stage, s.state AS stage_state,
                   s.attempt AS attempts, s.next_attempt_at,
                   s.error_code, s.error_description,
                   p.created_at, p.updated_at,
                   {age.format(col='p.due_at')} AS overdue_seconds
            FROM tx_process p
            JOIN tx_stage s ON s.uuid = p.uuid
             AND s.seq = (SELECT MIN(s2.seq) FROM tx_stage s2
                          WHERE s2.uuid = p.uuid AND s2.state <> 'COMPLETED')
            WHERE p.state IN ('PENDING', 'IN_PROGRESS', 'TERMINATED')
              AND p.finished_at IS NULL AND p.due_at IS NOT NULL AND p.due_at <= {now}""",
        "v_sla_daily": f"""
            SELECT process_code,
                   {day.format(col='created_at')} AS created_day,
                   COUNT(*) AS transactions,
                   {finished} AS finished,
                   {within} AS within_sla,
                   SUM(CASE WHEN finished_at IS NOT NULL AND finished_at > due_at
                            THEN 1 ELSE 0 END) AS late,
                   SUM(CASE WHEN finished_at IS NULL THEN 1 ELSE 0 END) AS open,
                   SUM(CASE WHEN finished_at IS NULL AND due_at <= {now}
                            THEN 1 ELSE 0 END) AS overdue,
                   CASE WHEN {finished} > 0
                        THEN {sql['ratio'].format(num=within, den=finished)} END AS attainment
            FROM tx_process
            WHERE due_at IS NOT NULL
            GROUP BY process_code, {day.format(col='created_at')}""",
    }


def upgrade() -> None:
    for table in ("tx_process", "tx_stage"):
        op.add_column(table, sa.Column("priority", sa.Integer(), nullable=False,
                                       server_default=sa.text("0")))
    for column in ("not_before", "deadline", "due_at"):
        op.add_column("tx_process", sa.Column(
            column, tracking.models.UTCDateTime(timezone=True), nullable=True))
    op.add_column("tx_stage", sa.Column(
        "due_at", tracking.models.UTCDateTime(timezone=True), nullable=True))
    op.add_column("tx_catalog_process", sa.Column("sla_seconds", sa.Float(), nullable=True))
    op.add_column("tx_catalog_platform", sa.Column("concurrency", sa.Integer(), nullable=True))

    op.drop_index("ix_tx_stage_runnable", table_name="tx_stage", **_where(RUNNABLE))
    op.create_index(
        "ix_tx_stage_runnable", "tx_stage",
        ["process_code", "platform", "stage", sa.text("priority DESC"), "next_attempt_at", "id"],
        **_where(RUNNABLE),
    )
    op.create_index(
        "ix_tx_stage_overdue", "tx_stage",
        ["process_code", "platform", "stage", "due_at", "next_attempt_at", "id"],
        **_where(OVERDUE_STAGES),
    )
    op.create_index("ix_tx_process_due", "tx_process", ["due_at", "process_code"],
                    **_where(OPEN_DUE))
    for name, select in _views(op.get_bind().dialect.name).items():
        op.execute(f"CREATE VIEW {name} AS {select}")


def downgrade() -> None:
    for name in reversed(list(_views(op.get_bind().dialect.name))):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("ix_tx_process_due", table_name="tx_process", **_where(OPEN_DUE))
    op.drop_index("ix_tx_stage_overdue", table_name="tx_stage", **_where(OVERDUE_STAGES))
    op.drop_index("ix_tx_stage_runnable", table_name="tx_stage", **_where(RUNNABLE))
    op.create_index(
        "ix_tx_stage_runnable", "tx_stage",
        ["process_code", "platform", "stage", "next_attempt_at"], **_where(RUNNABLE),
    )
    op.drop_column("tx_catalog_platform", "concurrency")
    op.drop_column("tx_catalog_process", "sla_seconds")
    op.drop_column("tx_stage", "due_at")
    for column in ("due_at", "deadline", "not_before"):
        op.drop_column("tx_process", column)
    for table in ("tx_stage", "tx_process"):
        op.drop_column(table, "priority")
