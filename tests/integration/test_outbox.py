"""The event outbox (``tracking.store.outbox``) on SQLite and PostgreSQL: business outcomes
read from the audit trail past a cursor, in batches, each sent once, none skipped, the rest
sent again after a failure; one emitter at a time; overdue transactions once per due time."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from tracking import ExecutionResult, Tracker, TxState
from tracking.store import cursors, outbox
from tracking.store.outbox import DeliveryFailed, deliver
from tracking.store.retention import Target

P = "CANCELLATION"
STEPS = [("A", "validate"), ("B", "process"), ("B", "confirm"), ("C", "main")]


class Recorder:
    """A sender that keeps what it was given, and fails when told to."""

    def __init__(self) -> None:
        self.batches: list[list[outbox.OutcomeEvent]] = []
        self.fail_at: int | None = None  # the number of the call that raises

    def __call__(self, batch) -> None:
        if self.fail_at is not None and len(self.batches) + 1 == self.fail_at:
            self.fail_at = None
            raise ConnectionError("Prefect is down")
        self.batches.append(list(batch))

    @property
    def sent(self) -> list[outbox.OutcomeEvent]:
        return [o for b in self.batches for o in b]


class Items:
    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.n = tracker, 0

    def new(self, **schedule) -> str:
        self.n += 1
        uuid, _ = self.tracker.start_or_resume(P, {"request_id": f"R{self.n}"}, **schedule)
        return uuid

    def completed(self) -> str:
        uuid = self.new()
        for platform, stage in STEPS:
            self.tracker.complete_stage(uuid, platform, 0, stage=stage, flow_run_id="f-1",
                                        task_run_id=f"t-{self.n}")
        return uuid

    def rejected(self) -> str:
        uuid = self.new()
        self.tracker.complete_stage(uuid, "A", ExecutionResult(10, "customer blocked"))
        return uuid

    def exhausted(self) -> str:
        uuid = self.new()
        self.tracker.complete_stage(uuid, "A", 0)
        for _ in range(2):  # B allows two attempts
            self.tracker.complete_stage(uuid, "B", ExecutionResult(-5, "SAP timeout"),
                                        stage="process")
        return uuid

    def cancelled(self) -> str:
        uuid = self.new()
        self.tracker.cancel(uuid, reason="withdrawn", actor="ops")
        return uuid

    def retrying(self) -> str:
        uuid = self.new()
        self.tracker.complete_stage(uuid, "A", 0)
        self.tracker.complete_stage(uuid, "B", ExecutionResult(-2, "timeout"), stage="process")
        return uuid


@pytest.fixture
def items(tracker) -> Items:
    return Items(tracker)


def newest_event(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT max(id) FROM tx_event")).scalar() or 0


def test_each_outcome_is_sent_once_in_order_in_batches(tracker, items, engine):
    expected = {items.completed(): "COMPLETED", items.rejected(): "REJECTED",
                items.exhausted(): "EXHAUSTED", items.cancelled(): "CANCELLED",
                items.completed(): "COMPLETED"}
    items.new(), items.retrying()  # waiting: no outcome
    sender = Recorder()
    delivery = deliver(engine, sender, batch_size=2)
    assert [len(b) for b in sender.batches] == [2, 2, 1]
    assert (delivery.sent, delivery.batches, delivery.busy) == (5, 3, False)
    assert delivery.position == newest_event(engine)  # read to the end, waiting ones too
    assert {o.uuid: o.state for o in sender.sent} == expected
    ids = [o.audit_id for o in sender.sent]
    assert ids == sorted(ids) and len(set(o.key for o in sender.sent)) == 5
    again = Recorder()
    assert deliver(engine, again).sent == 0 and again.batches == []  # nothing twice
    assert outbox.cursor_state(engine).sent == 5


def test_an_outcome_names_the_stage_that_decided_it(tracker, items, engine):
    done, rejected, exhausted, cancelled = (items.completed(), items.rejected(),
                                            items.exhausted(), items.cancelled())
    sender = Recorder()
    deliver(engine, sender)
    by_uuid = {o.uuid: o for o in sender.sent}
    assert (by_uuid[done].platform, by_uuid[done].stage) == ("C", "main")
    assert (by_uuid[done].flow_run_id, by_uuid[done].task_run_id) == ("f-1", "t-1")
    assert by_uuid[rejected].platform == "A" and by_uuid[rejected].error_code == 10
    assert by_uuid[rejected].description == "customer blocked"
    assert by_uuid[rejected].outcome == "BUSINESS_ERROR"
    assert (by_uuid[exhausted].platform, by_uuid[exhausted].stage) == ("B", "process")
    assert by_uuid[exhausted].attempt == 2 and by_uuid[exhausted].error_code == -5
    assert by_uuid[cancelled].platform is None and by_uuid[cancelled].actor == "ops"
    assert by_uuid[cancelled].kind == "CANCELLED"
    assert {o.business_key for o in sender.sent} == {"R1", "R2", "R3", "R4"}
    assert all(o.process_code == P and o.occurred.tzinfo is not None for o in sender.sent)


def test_a_failed_batch_is_sent_again_next_time_and_nothing_twice(tracker, items, engine):
    made = [items.completed() for _ in range(5)]
    sender = Recorder()
    sender.fail_at = 2
    with pytest.raises(DeliveryFailed, match="Prefect is down") as failed:
        deliver(engine, sender, batch_size=2)
    assert failed.value.delivery.sent == 2
    assert outbox.cursor_state(engine).owner is None  # released for the next emitter
    assert deliver(engine, sender, batch_size=2).sent == 3
    assert [o.uuid for o in sender.sent] == made  # each once, in order


def test_new_outcomes_go_with_the_next_delivery(tracker, items, engine):
    sender = Recorder()
    first = items.completed()
    deliver(engine, sender)
    second, third = items.rejected(), items.cancelled()
    deliver(engine, sender)
    assert [o.uuid for o in sender.sent] == [first, second, third]


def test_only_entering_a_final_state_is_an_outcome(tracker, items, engine):
    uuid = items.exhausted()
    tracker.requeue(uuid, reason="SAP is back", actor="ops")  # ends again: a new outcome
    tracker.complete_stage(uuid, "B", 0, stage="process")
    tracker.claim(P, "B", "confirm", owner="run-1", uuid=uuid)
    tracker.start_attempt(uuid, "B", "confirm", owner="run-1")
    tracker.cancel(uuid, reason="withdrawn", actor="ops")
    # The attempt that was running finishes: recorded, the transaction stays CANCELLED.
    tracker.complete_stage(uuid, "B", 0, stage="confirm", owner="run-1")
    trail = tracker.get_transaction(uuid).events
    assert [e.tx_state for e in trail[-2:]] == [TxState.CANCELLED, TxState.CANCELLED]
    sender = Recorder()
    deliver(engine, sender)
    assert [o.state for o in sender.sent] == ["EXHAUSTED", "CANCELLED"]
    assert sender.sent[1].kind == "CANCELLED" and len({o.key for o in sender.sent}) == 2


def test_max_events_stops_early_and_the_rest_follows(tracker, items, engine):
    made = [items.completed() for _ in range(5)]
    sender = Recorder()
    assert deliver(engine, sender, batch_size=2, max_events=3).sent == 3
    assert [len(b) for b in sender.batches] == [2, 1]
    assert deliver(engine, sender, batch_size=2).sent == 2
    assert [o.uuid for o in sender.sent] == made


def test_a_second_emitter_waits_for_the_first_or_leaves_it_the_work(tracker, items, engine,
                                                                     clock):
    items.completed()
    assert cursors.acquire(engine, cursors.PREFECT, "other", clock(), 60) == 0
    sender = Recorder()
    busy = deliver(engine, sender, wait_seconds=0, clock=clock)
    assert busy.busy and busy.sent == 0 and sender.batches == []
    clock.advance(61)  # the other emitter died: its lease ran out
    assert deliver(engine, sender, clock=clock).sent == 1


def test_two_emitters_at_once_send_each_outcome_once(db_url, items, engine):
    for _ in range(30):
        items.completed()
    sent, lock = [], threading.Lock()

    def slow(batch):
        with lock:
            sent.extend(o.key for o in batch)
        threading.Event().wait(0.05)

    def emitter():
        deliver(engine, slow, batch_size=4, wait_seconds=30)

    threads = [threading.Thread(target=emitter) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == 30 and len(set(sent)) == 30


def test_an_emitter_that_lost_the_cursor_does_not_move_it(tracker, items, engine, clock):
    items.completed(), items.completed()

    def slow_then_taken_over(batch):
        clock.advance(400)  # longer than the lease: another emitter takes over meanwhile
        assert cursors.acquire(engine, cursors.PREFECT, "other", clock(), 60) is not None

    with pytest.raises(DeliveryFailed, match="taken over"):
        deliver(engine, slow_then_taken_over, clock=clock)
    state = outbox.cursor_state(engine)
    assert state.position == 0 and state.owner == "other" and state.pending == 2


def test_dry_run_and_status(tracker, items, engine):
    done, rejected = items.completed(), items.rejected()
    assert [o.uuid for o in outbox.pending(engine)] == [done, rejected]
    assert [o.uuid for o in outbox.pending(engine, limit=1)] == [done]
    state = outbox.cursor_state(engine)
    assert (state.position, state.pending, state.sent, state.owner) == (0, 2, 0, None)
    assert state.newest_event_id == newest_event(engine)
    deliver(engine, Recorder())
    assert outbox.pending(engine) == []
    assert outbox.cursor_state(engine).pending == 0


def test_overdue_transactions_are_sent_once_per_due_time(tracker, items, engine, clock):
    # The fake clock is in the past: a deadline after it is past for the database's clock.
    late = items.new(deadline=clock.now + timedelta(hours=1))
    items.new(deadline=datetime.now(UTC) + timedelta(days=30))  # not due yet
    on_time = items.new()  # no deadline
    sender = Recorder()
    delivery = deliver(engine, sender)
    assert (delivery.sent, delivery.overdue) == (1, 1)
    (overdue,) = sender.sent
    assert (overdue.uuid, overdue.state, overdue.audit_id) == (late, "OVERDUE", None)
    assert overdue.due_at == clock.now + timedelta(hours=1) == overdue.occurred
    assert (overdue.platform, overdue.stage) == ("A", "validate")  # where it waits
    assert deliver(engine, sender).sent == 0  # once
    assert outbox.cursor_state(engine).pending_overdue == 0
    for platform, stage in STEPS:
        tracker.complete_stage(late, platform, 0, stage=stage)
    tracker.cancel(on_time, reason="withdrawn", actor="ops")
    deliver(engine, sender)
    assert [(o.uuid, o.state) for o in sender.sent[1:]] == [(late, "COMPLETED"),
                                                            (on_time, "CANCELLED")]


def test_an_overdue_transaction_whose_send_failed_is_sent_again(tracker, items, engine, clock):
    late = items.new(deadline=clock.now)
    sender = Recorder()
    sender.fail_at = 1
    with pytest.raises(DeliveryFailed):
        deliver(engine, sender)
    assert outbox.cursor_state(engine).pending_overdue == 1
    deliver(engine, sender)
    assert [o.uuid for o in sender.sent] == [late]


def test_outcomes_of_purged_transactions_do_not_hide_later_ones(tracker, items, engine, clock):
    """A purge of the newest events: SQLite would reuse their ids (the migration's trigger
    lowers the cursor with them), PostgreSQL's sequence goes on."""
    old = [items.completed(), items.rejected()]
    sender = Recorder()
    deliver(engine, sender)
    top = newest_event(engine)
    clock.advance(3600)
    target = Target(P, timedelta(minutes=1), clock.now - timedelta(minutes=1))
    assert cursors.acquire(engine, cursors.PREFECT, "emitter", clock(), 60) == top
    tracker.purge([target], lambda records: None)
    assert newest_event(engine) == 0
    state = outbox.cursor_state(engine)
    if engine.dialect.name == "sqlite":  # lowered, and taken from the emitter holding it
        assert (state.position, state.owner) == (0, None)
    else:
        assert (state.position, state.owner) == (top, "emitter")
        cursors.release(engine, cursors.PREFECT, "emitter", clock())
    new = items.completed()
    deliver(engine, sender)
    assert [o.uuid for o in sender.sent] == [*old, new]
    if engine.dialect.name == "sqlite":
        assert sender.sent[-1].audit_id <= top  # an id used again, sent all the same


def test_a_missing_cursor_starts_at_the_beginning(tracker, items, engine):
    made = items.completed()
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM tx_event_cursor"))
    sender = Recorder()
    deliver(engine, sender)
    assert [o.uuid for o in sender.sent] == [made]


def test_the_migration_starts_the_cursor_at_the_end_of_the_trail(tracker, items, engine):
    from alembic import command

    from tracking.db import _alembic_config, upgrade

    items.completed()
    with engine.begin() as conn:
        command.downgrade(_alembic_config(conn), "0006")
    assert "tx_event_cursor" not in sa.inspect(engine).get_table_names()
    upgrade(engine)
    assert outbox.cursor_state(engine).position == newest_event(engine)
    later = items.rejected()
    sender = Recorder()
    deliver(engine, sender)
    assert [o.uuid for o in sender.sent] == [later]  # not the history before the upgrade


def test_bad_arguments_are_refused(engine):
    for kwargs in ({"batch_size": 0}, {"batch_size": outbox.MAX_BATCH + 1},
                   {"max_events": 0}, {"lease_seconds": 0}):
        with pytest.raises(ValueError):
            deliver(engine, Recorder(), **kwargs)


# -- PostgreSQL: an id that commits after a higher one ----------------------------------------


@pytest.fixture
def pg_engine(postgres_url):
    from tracking import connect

    engine = connect(postgres_url)
    yield engine
    engine.dispose()


def _insert_outcome(conn, uuid: str) -> None:
    """An audit event that completes ``uuid`` (as an attempt would record it)."""
    conn.execute(sa.text(
        "INSERT INTO tx_event (uuid, process_code, kind, tx_state, platform, stage, "
        "created_at) VALUES (:u, :p, 'ATTEMPT', 'COMPLETED', 'C', 'main', now())"
    ), {"u": uuid, "p": P})


@pytest.mark.postgres
def test_postgres_an_event_committed_late_below_the_horizon_is_not_skipped(pg_engine, clock):
    from tests.conftest import cancellation_process

    tracker = Tracker(pg_engine, processes=[cancellation_process()], clock=clock)
    slow, fast = (tracker.start_or_resume(P, {"request_id": k})[0] for k in ("slow", "fast"))
    deliver(pg_engine, Recorder())  # past the CREATED events
    sender = Recorder()
    with pg_engine.connect() as writer:
        busy = writer.begin()
        _insert_outcome(writer, slow)  # takes the lower id, commits last
        with pg_engine.begin() as other:
            _insert_outcome(other, fast)
        delivery = deliver(pg_engine, sender, settle_seconds=0.2)
        # The open writer holds the gap: nothing past it is sent, the cursor stays before it.
        assert sender.sent == [] and delivery.sent == 0
        busy.commit()
    deliver(pg_engine, sender)
    assert [o.uuid for o in sender.sent] == [slow, fast]


@pytest.mark.postgres
def test_postgres_a_rolled_back_id_is_passed_over(pg_engine, clock):
    from tests.conftest import cancellation_process

    tracker = Tracker(pg_engine, processes=[cancellation_process()], clock=clock)
    uuid = tracker.start_or_resume(P, {"request_id": "x"})[0]
    with pg_engine.connect() as conn:
        with conn.begin() as rolled_back:
            _insert_outcome(conn, uuid)
            rolled_back.rollback()
    with pg_engine.begin() as conn:
        _insert_outcome(conn, uuid)
    sender = Recorder()
    delivery = deliver(pg_engine, sender)
    assert [o.uuid for o in sender.sent] == [uuid]
    assert delivery.position == newest_event(pg_engine)
