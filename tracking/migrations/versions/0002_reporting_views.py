"""Reporting views for BI tools (Metabase, Grafana, Excel): plain SQL over the tracking tables.

Revision ID: 0002
Revises: 0001

Views (the README's Operations section documents every column):

* ``v_transaction_summary``: transactions per process, creation day (UTC) and state.
* ``v_stage_summary``: stages per process, platform, stage, creation day and state.
* ``v_error_summary``: failed attempts per process, platform, stage, outcome, error code, day.
* ``v_pending_aging``: every waiting transaction with the stage it waits at and its age.
* ``v_hourly_throughput``: transactions finished per process and UTC hour, by final state.
* ``v_attempt_duration``: one row per recorded attempt with its duration in seconds.

Types are the same on both databases except timestamps and days, which come out comparable:
timestamps are ``timestamp with time zone`` on PostgreSQL and UTC text
``YYYY-MM-DD HH:MM:SS.ffffff`` on SQLite (how the tables store them: it sorts and compares
as time); days are ``date`` on PostgreSQL and ``YYYY-MM-DD`` text on SQLite.

Note for later migrations: SQLite refuses to rename a table a view depends on, so a migration
that batch-alters tx_process, tx_stage or tx_event on SQLite must drop these views first and
create them again afterwards (copy ``_views`` into that migration).
"""

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def _dialect_sql(dialect: str) -> dict[str, str]:
    """SQL fragments that differ between PostgreSQL and SQLite (all in UTC)."""
    if dialect == "postgresql":
        return {
            "day": "CAST({col} AT TIME ZONE 'UTC' AS DATE)",
            "hour": "date_trunc('hour', {col} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
            "age": "CAST(EXTRACT(EPOCH FROM (CURRENT_TIMESTAMP - {col})) AS DOUBLE PRECISION)",
            "seconds": "CAST(EXTRACT(EPOCH FROM ({end} - {start})) AS DOUBLE PRECISION)",
        }
    return {
        "day": "date({col})",
        "hour": "strftime('%Y-%m-%d %H:00:00.000000', {col})",
        # julianday() is a double: exact to about 10 microseconds, so round to milliseconds.
        "age": "ROUND((julianday('now') - julianday({col})) * 86400.0, 3)",
        "seconds": "ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)",
    }


def _views(dialect: str) -> dict[str, str]:
    sql = _dialect_sql(dialect)
    day, hour, age, seconds = sql["day"], sql["hour"], sql["age"], sql["seconds"]
    return {
        "v_transaction_summary": f"""
            SELECT process_code,
                   {day.format(col='created_at')} AS created_day,
                   state,
                   COUNT(*) AS transactions,
                   MIN(created_at) AS first_created_at,
                   MAX(created_at) AS last_created_at,
                   MAX(updated_at) AS last_updated_at
            FROM tx_process
            GROUP BY process_code, {day.format(col='created_at')}, state""",
        "v_stage_summary": f"""
            SELECT s.process_code, s.platform, s.platform_order, s.stage, s.seq,
                   {day.format(col='p.created_at')} AS created_day,
                   s.state,
                   COUNT(*) AS stages,
                   SUM(s.attempt) AS attempts,
                   MAX(s.updated_at) AS last_updated_at
            FROM tx_stage s
            JOIN tx_process p ON p.uuid = s.uuid
            GROUP BY s.process_code, s.platform, s.platform_order, s.stage, s.seq,
                     {day.format(col='p.created_at')}, s.state""",
        "v_error_summary": f"""
            SELECT process_code, platform, stage, outcome, error_code,
                   {day.format(col='created_at')} AS error_day,
                   COUNT(*) AS errors,
                   COUNT(DISTINCT uuid) AS transactions,
                   MIN(created_at) AS first_seen,
                   MAX(created_at) AS last_seen,
                   MAX(description) AS description
            FROM tx_event
            WHERE kind IN ('ATTEMPT', 'LEASE_EXPIRED')
              AND outcome IN ('BUSINESS_ERROR', 'SYSTEM_ERROR')
            GROUP BY process_code, platform, stage, outcome, error_code,
                     {day.format(col='created_at')}""",
        "v_pending_aging": f"""
            SELECT p.uuid, p.process_code, p.business_key, p.state AS tx_state,
                   s.platform, s.stage, s.state AS stage_state,
                   s.attempt AS attempts, s.attempts_allowed, s.next_attempt_at,
                   s.error_code, s.error_description,
                   p.created_at, p.updated_at,
                   {age.format(col='p.created_at')} AS age_seconds
            FROM tx_process p
            JOIN tx_stage s ON s.uuid = p.uuid
             AND s.seq = (SELECT MIN(s2.seq) FROM tx_stage s2
                          WHERE s2.uuid = p.uuid AND s2.state <> 'COMPLETED')
            WHERE p.state IN ('PENDING', 'IN_PROGRESS', 'TERMINATED')""",
        "v_hourly_throughput": f"""
            SELECT process_code,
                   {hour.format(col='finished_at')} AS hour,
                   SUM(CASE WHEN state = 'COMPLETED' THEN 1 ELSE 0 END) AS completed,
                   SUM(CASE WHEN state = 'REJECTED' THEN 1 ELSE 0 END) AS rejected,
                   SUM(CASE WHEN state = 'EXHAUSTED' THEN 1 ELSE 0 END) AS exhausted,
                   SUM(CASE WHEN state = 'CANCELLED' THEN 1 ELSE 0 END) AS cancelled,
                   COUNT(*) AS finished
            FROM tx_process
            WHERE finished_at IS NOT NULL
            GROUP BY process_code, {hour.format(col='finished_at')}""",
        "v_attempt_duration": f"""
            SELECT e.id AS event_id, e.uuid, e.process_code, e.platform, e.stage, e.attempt,
                   e.outcome, e.error_code, e.started_at, e.created_at AS finished_at,
                   {seconds.format(start='e.started_at', end='e.created_at')}
                       AS duration_seconds
            FROM tx_event e
            WHERE e.kind = 'ATTEMPT' AND e.started_at IS NOT NULL""",
    }


def upgrade() -> None:
    for name, select in _views(op.get_bind().dialect.name).items():
        op.execute(f"CREATE VIEW {name} AS {select}")


def downgrade() -> None:
    for name in reversed(list(_views(op.get_bind().dialect.name))):
        op.execute(f"DROP VIEW IF EXISTS {name}")
