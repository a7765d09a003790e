"""``store.driver`` and ``db.write_transaction``: the one-item paths run their statements on
the driver's cursor, and must read, fail and roll back exactly as through SQLAlchemy."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from tests.integration.test_queries import count_statements
from tracking import ExecutionResult
from tracking.connections import write_transaction
from tracking.models import EventKind, StageState, TxState
from tracking.store.driver import execute, fetch
from tracking.store.sql import EVENT, INSERT_EVENTS, LOCK_STAGES, LOCK_TX, TX

P = "CANCELLATION"


def _event(uuid: str, now) -> dict:
    return {"uuid": uuid, "process_code": P, "kind": EventKind.CREATED, "description": "probe",
            "created_at": now}


def _probes(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(EVENT).where(
            EVENT.c.description == "probe")).scalar_one()


def _writes_from_another_thread(tracker) -> bool:
    """Whether another thread can write now (SQLite: the process's writer lock is free)."""
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (tracker.start_or_resume(P, {"request_id": "OTHER"}), done.set()),
        daemon=True)
    worker.start()
    worker.join(timeout=30)
    return done.is_set()


def test_fetch_reads_what_conn_execute_reads(tracker):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "R1"})
    (stage,) = tracker.claim(P, "A", owner="w")
    tracker.start_attempt(uuid, "A", stage.stage, owner="w")
    with tracker.engine.begin() as conn:
        for statement in (LOCK_STAGES, LOCK_TX):
            expected = conn.execute(statement, {"b_uuid": uuid}).all()
            got = fetch(conn, statement, {"b_uuid": uuid})
            assert [tuple(r) for r in got] == [tuple(r) for r in expected]
            assert [r._fields for r in got] == [tuple(r._fields) for r in expected]
            # Typed as SQLAlchemy types them: aware UTC datetimes, states as enums.
            assert [[type(v) for v in r] for r in got] == [[type(v) for v in r]
                                                           for r in expected]
    (tx,) = got  # LOCK_TX's, read last
    assert tx.state == TxState.IN_PROGRESS and tx.finished_at is None


def test_a_driver_error_is_sqlalchemys_and_rolls_the_write_back(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "R1"})
    duplicate = dict(_tx_row(tracker, uuid)._mapping)
    with pytest.raises(sa.exc.IntegrityError) as raised:  # noqa: PT012
        with write_transaction(tracker.engine) as conn:
            execute(conn, INSERT_EVENTS, _event(uuid, clock()))
            execute(conn, sa.insert(TX), duplicate)  # its uuid is taken
    assert "INSERT INTO tx_process" in str(raised.value)  # says which statement failed
    assert _probes(tracker.engine) == 0  # the event written before it was rolled back
    assert _writes_from_another_thread(tracker)


def test_an_error_in_the_transaction_rolls_it_back_and_frees_the_writer(tracker, clock):
    uuid, _ = tracker.start_or_resume(P, {"request_id": "R1"})
    with pytest.raises(RuntimeError, match="platform gone"):  # noqa: PT012
        with write_transaction(tracker.engine) as conn:
            execute(conn, INSERT_EVENTS, _event(uuid, clock()))
            raise RuntimeError("platform gone")
    assert _probes(tracker.engine) == 0
    assert _writes_from_another_thread(tracker)
    with write_transaction(tracker.engine) as conn:
        execute(conn, INSERT_EVENTS, _event(uuid, clock()))
    assert _probes(tracker.engine) == 1


def test_a_watched_engine_sees_every_statement_of_the_one_item_paths(tracker):
    """SQLAlchemy's cursor events (tracing, tests, echo) still see the statements the
    driver would run past them."""
    with count_statements(tracker.engine) as seen:
        uuid, _ = tracker.start_or_resume(P, {"request_id": "R1"})
        (stage,) = tracker.claim(P, "A", owner="w")
        tracker.start_attempt(uuid, "A", stage.stage, owner="w")
        tracker.complete_stage(uuid, "A", ExecutionResult(0), owner="w")
    written = {" ".join(s.split()[:3]) for s in seen if not s.startswith("SELECT")}
    assert {"INSERT INTO tx_process", "INSERT INTO tx_stage", "INSERT INTO tx_event",
            "UPDATE tx_stage SET", "UPDATE tx_process SET"} <= written
    assert tracker.get_stages([uuid], "A", stage.stage)[0].state == StageState.COMPLETED


@pytest.mark.postgres
def test_a_lost_postgresql_connection_is_invalidated_and_the_next_write_works(
        postgres_url, clock):
    from tests.conftest import cancellation_process
    from tracking import Tracker, connect

    engine = connect(postgres_url)
    tracker = Tracker(engine, processes=[cancellation_process()], clock=clock)
    uuid, _ = tracker.start_or_resume(P, {"request_id": "R1"})
    try:
        with pytest.raises(sa.exc.DBAPIError) as raised:  # noqa: PT012
            with write_transaction(engine) as conn:
                (me,) = fetch(conn, sa.select(sa.func.pg_backend_pid().label("pid")), {})
                with engine.connect() as other:
                    other.execute(sa.select(sa.func.pg_terminate_backend(me.pid)))
                execute(conn, INSERT_EVENTS, _event(uuid, clock()))
        assert raised.value.connection_invalidated
        assert tracker.start_or_resume(P, {"request_id": "R2"})[1]  # a fresh connection
        assert _probes(engine) == 0
    finally:
        engine.dispose()


def _tx_row(tracker, uuid: str):
    with tracker.engine.connect() as conn:
        return conn.execute(sa.select(TX).where(TX.c.uuid == uuid)).one()
