"""Finding work is one indexed statement whose cost follows `limit`, not the table."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from tracking import Tracker
from tracking.store import claims

P = "CANCELLATION"


@contextmanager
def count_statements(engine):
    seen: list[str] = []

    def record(conn, cursor, statement, params, context, executemany):
        if statement.split(None, 1)[0].upper() in ("SELECT", "UPDATE", "INSERT", "DELETE", "WITH"):
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def _fill(tracker: Tracker, n: int) -> None:
    tracker.start_many(P, [{"request_id": f"Q{i}"} for i in range(n)])


def test_get_pending_stages_is_one_statement(tracker):
    _fill(tracker, 60)
    with count_statements(tracker.engine) as seen:
        stages = tracker.get_pending_stages(P, "A", limit=50)
    assert len(stages) == 50
    assert len(seen) == 1, seen


def test_claim_statement_count_does_not_grow_with_rows(tracker):
    _fill(tracker, 120)
    with count_statements(tracker.engine) as small:
        assert len(tracker.claim(P, "A", owner="w", limit=5)) == 5
    with count_statements(tracker.engine) as large:
        assert len(tracker.claim(P, "A", owner="w", limit=100)) == 100
    assert len(small) == len(large) <= 5, large


def test_runnable_query_uses_the_runnable_index(tracker, engine):
    _fill(tracker, 30)
    query = claims.runnable(P, "A", "validate", tracker.clock()).limit(10)
    compiled = query.compile(engine, compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            plan = " ".join(str(r) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
        else:
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = " ".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {compiled}"))
    assert "ix_tx_stage_runnable" in plan, plan
    assert "TEMP B-TREE" not in plan.upper()  # no sort step: the index order is used


def test_postgresql_plans_each_execution_with_its_parameters(engine):
    """psycopg prepares a statement run five times; a generic plan of a batch's
    ``uuid IN (...)``, made from an empty table's statistics, scanned every stage."""
    if engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL setting")
    with engine.connect() as first, engine.connect() as second:  # two pooled connections
        for conn in (first, second):
            assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_custom_plan"
            conn.rollback()
    with engine.begin() as conn:  # the setting survives a transaction's end
        conn.exec_driver_sql("SELECT 1")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "force_custom_plan"
