"""``store.driver.execute_many`` and ``store.sql.execute_grouped``: a batch written without
SQLAlchemy's per-row parameter handling stores exactly what ``conn.execute(statement, rows)``
stores (timestamps in the dialect's own format, which SQLite compares as text; states by
name; NULLs)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from tests.integration.test_queries import count_statements
from tracking.models import EventKind, TxState
from tracking.store.sql import (
    CHUNK,
    EVENT,
    GROUP,
    INSERT_EVENT,
    INSERT_EVENTS,
    TX,
    UPDATE_TX,
    UPDATE_TXS,
    execute_grouped,
    execute_many,
)

ROUND = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # no microseconds: SQLite's driver drops them


def _events(uuids: list[str], marker: str) -> list[dict]:
    return [
        {"uuid": u, "process_code": "P", "kind": EventKind.CREATED,
         "tx_state": TxState.PENDING if k % 2 else None, "description": marker,
         "created_at": ROUND + timedelta(microseconds=k % 2),
         "started_at": (ROUND + timedelta(hours=1)).astimezone(ZoneInfo("Europe/Paris"))}
        for k, u in enumerate(uuids)
    ]


def _stored(conn: sa.Connection, marker: str) -> list[tuple]:
    return [tuple(r) for r in conn.exec_driver_sql(
        "SELECT uuid, kind, tx_state, created_at, started_at FROM tx_event "
        f"WHERE description = '{marker}' ORDER BY uuid")]


def test_it_stores_what_conn_execute_stores(tracker):
    engine = tracker.engine
    uuids = sorted(i.uuid for i in tracker.start_many(
        "CANCELLATION", [{"request_id": f"R{k}"} for k in range(4)]))
    with engine.begin() as conn:
        conn.execute(INSERT_EVENT, _events(uuids, "sqlalchemy"))
        execute_many(conn, INSERT_EVENTS, _events(uuids, "execute_many"))
        assert _stored(conn, "execute_many") == _stored(conn, "sqlalchemy")
        raw = conn.exec_driver_sql(
            "SELECT created_at FROM tx_event WHERE description = 'execute_many' "
            "ORDER BY uuid").scalars().all()
        if engine.dialect.name == "sqlite":  # compared as text: one format for all
            assert raw[0] == "2026-01-05 09:00:00.000000"
        read = conn.execute(sa.select(EVENT.c.started_at, EVENT.c.tx_state).where(
            EVENT.c.description == "execute_many")).all()
    assert {r.started_at for r in read} == {ROUND + timedelta(hours=1)}
    assert {r.tx_state for r in read} == {TxState.PENDING, None}


def test_it_refuses_rows_that_leave_out_a_column_with_a_default(tracker):
    with tracker.engine.begin() as conn, pytest.raises(ValueError, match="every value must"):
        execute_many(conn, sa.insert(EVENT).inline(), [{"uuid": "u", "kind": EventKind.CREATED}])


def test_execute_grouped_writes_each_row_with_one_statement_per_shared_set_of_values(tracker):
    """GROUP or more rows sharing their values run as one ``IN`` statement (the list bound as
    one parameter, however long), the others as one executemany: every row ends as one
    UPDATE each would leave it."""
    uuids = sorted(i.uuid for i in tracker.start_many(
        "CANCELLATION", [{"request_id": f"G{k}"} for k in range(CHUNK + GROUP + 6)]))
    at = ROUND + timedelta(hours=2)
    alike, group, rest = uuids[: CHUNK + 3], uuids[CHUNK + 3 : -3], uuids[-3:]
    wanted = {u: {"state": TxState.COMPLETED, "updated_at": at} for u in alike}  # 1 statement
    wanted.update({u: {"state": TxState.REJECTED, "updated_at": at} for u in group})  # 1
    # two alike (fewer than GROUP), one alone: one executemany
    wanted[rest[0]] = wanted[rest[1]] = {"state": TxState.REJECTED,
                                         "updated_at": at + timedelta(seconds=1)}
    wanted[rest[2]] = {"state": TxState.CANCELLED, "updated_at": at}
    assert len(group) == GROUP
    groups: dict[tuple, list[str]] = {}
    for u, values in wanted.items():
        groups.setdefault((values["state"], values["updated_at"]), []).append(u)
    with count_statements(tracker.engine) as seen, tracker.engine.begin() as conn:
        execute_grouped(conn, UPDATE_TX, UPDATE_TXS, "b_uuid", ["state", "updated_at"], groups)
    assert len(seen) == 3, seen
    with tracker.engine.connect() as conn:
        stored = {r.uuid: {"state": r.state, "updated_at": r.updated_at} for r in conn.execute(
            sa.select(TX.c.uuid, TX.c.state, TX.c.updated_at))}
    assert stored == wanted
