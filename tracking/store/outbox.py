"""The event outbox: business outcomes read from the audit trail past a cursor, handed to a
sender in batches, the cursor moved on after each batch was sent.

The audit trail (``tx_event``) already records every transition with the state it left the
transaction in (``tx_state``). An *outcome* is an event whose transaction entered a final
state there (COMPLETED, REJECTED, EXHAUSTED, CANCELLED: ``states.FINAL_TX_STATES``): its
``tx_state`` is final and differs from the one of the transaction's previous event (a second
cancel of a cancelled transaction is not a new outcome; a requeued transaction that ends
again is). ``deliver`` reads them in id order, ``batch_size`` at a time, hands each batch to
a sender (``tracking.prefect_events`` sends Prefect events) and then moves the cursor
(``tx_event_cursor``) past it: nothing on the hot path changes, and a batch costs one call.

Delivery is at least once, in order:

* the cursor moves only after the sender returned, so a batch whose sending failed (or
  whose emitter died) is sent again by the next emitter; a duplicate is possible only after
  a crash between sending and moving the cursor, and carries the same ``key`` (the Prefect
  event id is derived from it), so the receiver can drop it;
* one emitter at a time: it holds the cursor (``tracking.store.cursors``: a lease, renewed
  with each batch) while it sends, and moves it only if it still holds it at the position it
  read; a second emitter waits for it (``wait_seconds``) or leaves the work to it. No
  database lock is held while sending (SQLite's write lock would stop every writer for a
  network call); an emitter that died is taken over when its lease runs out;
* nothing is skipped: the cursor only moves over ids that can no longer appear
  (``tracking.store.horizon``: on PostgreSQL a transaction may commit an id below one
  already committed);
* an overdue transaction (``v_overdue``: waiting past its due time) is sent once per due
  time: ``tx_overdue_sent`` records it after its batch was sent, under the same cursor. One
  that fell due and finished between two emitter runs is not sent as overdue (the SLA
  report counts it as late).

A retention purge deletes the events of the transactions it purges; one whose outcome was not
sent yet (the emitter far behind) is not sent. On SQLite a purge of the newest events lets
their ids be used again: the trigger of migration 0007 lowers the cursor with them and takes
it from its holder (whose next move then fails: ``DeliveryFailed``, sent again next time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tracking.connections import read_only
from tracking.errors import TrackingError
from tracking.models import TxState, UTCDateTime, utcnow
from tracking.states import FINAL_TX_STATES, in_order
from tracking.store import cursors
from tracking.store.cursors import CURSOR, PREFECT, SENT_OVERDUE
from tracking.store.horizon import SETTLE_SECONDS, settled_horizon
from tracking.store.sql import EVENT, TX, check_limit, check_owner, check_seconds

#: The view of migration 0006: every waiting transaction past its due time.
V_OVERDUE = sa.table(
    "v_overdue", sa.column("uuid"), sa.column("process_code"), sa.column("business_key"),
    sa.column("tx_state"), sa.column("due_at", UTCDateTime()), sa.column("platform"),
    sa.column("stage"), sa.column("attempts"), sa.column("error_code"),
    sa.column("error_description"),
)
OVERDUE = "OVERDUE"  # the state of an overdue outcome (it is not a TxState: nothing ended)
DEFAULT_BATCH = 500
MAX_BATCH = 10_000
DEFAULT_LEASE_SECONDS = 300.0
_POLL_SECONDS = 0.2
_FINAL = in_order(FINAL_TX_STATES)


@dataclass(frozen=True)
class OutcomeEvent:
    """One business outcome to send: a transaction that entered a final state.

    Attributes:
        key: what identifies this outcome for ever (the sender derives its event id from
            it): ``tx_event:<uuid>:<audit event id>``, ``overdue:<uuid>:<due time>``.
        audit_id: the ``tx_event`` row that recorded it (None for ``OVERDUE``).
        state: the final state entered (``COMPLETED``, ``REJECTED``, ``EXHAUSTED``,
            ``CANCELLED``), or ``OVERDUE``: the transaction is waiting past its due time.
        platform, stage: the stage whose attempt decided it (None for an operator's cancel);
            for ``OVERDUE`` the stage it waits at.
        occurred: when it was recorded (``OVERDUE``: when it fell due).
        due_at: the due time (``OVERDUE`` only).
        kind, attempt, outcome, error_code, description, actor: of the audit event.
        flow_run_id, task_run_id: the Prefect runs that recorded it, when known.
    """

    key: str
    audit_id: int | None
    uuid: str
    process_code: str
    business_key: str
    state: str
    occurred: datetime
    platform: str | None = None
    stage: str | None = None
    kind: str | None = None
    attempt: int | None = None
    outcome: str | None = None
    error_code: int | None = None
    description: str | None = None
    actor: str | None = None
    flow_run_id: str | None = None
    task_run_id: str | None = None
    due_at: datetime | None = None


#: Sends a batch of outcomes; returns only when they were delivered, raises otherwise.
Sender = Callable[[Sequence[OutcomeEvent]], None]


@dataclass(frozen=True)
class Delivery:
    """What one ``deliver`` did.

    Attributes:
        sent: outcomes handed to the sender (and the cursor moved past them).
        batches: sender calls.
        position: the cursor afterwards (the last audit event id read).
        busy: another emitter held the cursor for all of ``wait_seconds``: nothing was done
            (that one sends what there is).
        overdue: how many of ``sent`` were overdue transactions.
    """

    sent: int
    batches: int
    position: int
    busy: bool = False
    overdue: int = 0


class DeliveryFailed(TrackingError):
    """Sending stopped: the sender failed, or the cursor was taken over. ``delivery`` says
    what was sent before; the cursor stays before the batch that failed."""

    def __init__(self, message: str, delivery: Delivery) -> None:
        super().__init__(message)
        self.delivery = delivery


@dataclass(frozen=True)
class CursorState:
    """Where a cursor is: its position, the newest audit event, who holds it, what it sent,
    and the outcomes not sent yet (final states past it; overdue transactions)."""

    name: str
    position: int
    newest_event_id: int
    owner: str | None
    lease_expires_at: datetime | None
    sent: int
    updated_at: datetime | None
    pending: int
    pending_overdue: int = 0


# -- reading outcomes --------------------------------------------------------------------


def _outcomes_query() -> sa.Select[Any]:
    e, p = EVENT.alias("e"), EVENT.alias("p")
    previous = (
        sa.select(p.c.tx_state)
        .where(p.c.uuid == e.c.uuid, p.c.id < e.c.id)
        .order_by(p.c.id.desc())
        .limit(1)
        .scalar_subquery()
    )
    return (
        sa.select(
            e.c.id, e.c.uuid, e.c.process_code, TX.c.business_key, e.c.tx_state,
            e.c.created_at, e.c.platform, e.c.stage, e.c.kind, e.c.attempt, e.c.outcome,
            e.c.error_code, e.c.description, e.c.actor, e.c.flow_run_id, e.c.task_run_id,
        )
        .join(TX, TX.c.uuid == e.c.uuid)
        .where(
            e.c.id > sa.bindparam("b_after"),
            e.c.id <= sa.bindparam("b_upto"),
            e.c.tx_state.in_(_FINAL),
            sa.or_(previous.is_(None), previous != e.c.tx_state),
        )
        .order_by(e.c.id)
        .limit(sa.bindparam("b_limit"))
    )


_OUTCOMES = _outcomes_query()


def final_outcomes(conn: Connection, after: int, upto: int, limit: int) -> list[OutcomeEvent]:
    """The outcomes recorded by the audit events ``after < id <= upto``, in id order, at
    most ``limit`` (one statement on the primary key and ``ix_tx_event_uuid``)."""
    rows = conn.execute(_OUTCOMES, {"b_after": after, "b_upto": upto, "b_limit": limit})
    return [
        OutcomeEvent(
            key=f"tx_event:{r.uuid}:{r.id}", audit_id=r.id, uuid=r.uuid,
            process_code=r.process_code, business_key=r.business_key,
            state=TxState(r.tx_state).value, occurred=r.created_at, platform=r.platform,
            stage=r.stage, kind=None if r.kind is None else str(r.kind.value),
            attempt=r.attempt, outcome=None if r.outcome is None else str(r.outcome.value),
            error_code=r.error_code, description=r.description, actor=r.actor,
            flow_run_id=r.flow_run_id, task_run_id=r.task_run_id,
        )
        for r in rows
    ]


def overdue_outcomes(conn: Connection, limit: int) -> list[OutcomeEvent]:
    """The transactions waiting past their due time (``v_overdue``) whose going overdue was
    not sent for that due time yet, the earliest due first, at most ``limit``."""
    v, sent = V_OVERDUE, SENT_OVERDUE
    rows = conn.execute(
        sa.select(v)
        .outerjoin(sent, sa.and_(sent.c.uuid == v.c.uuid, sent.c.due_at == v.c.due_at))
        .where(sent.c.uuid.is_(None))
        .order_by(v.c.due_at, v.c.uuid)
        .limit(limit)
    )
    return [
        OutcomeEvent(
            key=f"overdue:{r.uuid}:{r.due_at.isoformat()}", audit_id=None, uuid=r.uuid,
            process_code=r.process_code, business_key=r.business_key, state=OVERDUE,
            occurred=r.due_at, platform=r.platform, stage=r.stage, attempt=r.attempts,
            error_code=r.error_code, description=r.error_description, due_at=r.due_at,
        )
        for r in rows
    ]


def deliver(
    engine: Engine,
    send: Sender,
    *,
    name: str = PREFECT,
    batch_size: int = DEFAULT_BATCH,
    max_events: int | None = None,
    owner: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    wait_seconds: float = 0.0,
    clock: Callable[[], datetime] = utcnow,
    sleep: Callable[[float], None] = time.sleep,
    settle_seconds: float = SETTLE_SECONDS,
) -> Delivery:
    """Send every outcome not sent yet, ``batch_size`` per ``send`` call, recording each batch
    as sent after ``send`` returned: the final states past cursor ``name`` (in audit trail
    order), then the transactions that went overdue (``v_overdue``). Until none is left, or
    ``max_events`` were sent.

    Args:
        send: delivers a batch or raises (then the batch stays unsent: ``DeliveryFailed``,
            with what was sent before).
        owner: who holds the cursor meanwhile (default ``cursors.default_owner()``).
        lease_seconds: how long the cursor stays held without a batch moving it (an
            emitter that died is taken over after that); keep it above a batch's sending.
        wait_seconds: how long to wait for another emitter that holds the cursor; after
            that ``Delivery(busy=True)``.
    """
    batch_size = check_limit(batch_size, MAX_BATCH)
    if max_events is not None:
        max_events = check_limit(max_events, 2**62)
    lease_seconds = check_seconds(lease_seconds)
    owner = check_owner(owner or cursors.default_owner())
    deadline = time.monotonic() + max(0.0, wait_seconds)
    while (position := cursors.acquire(engine, name, owner, clock(), lease_seconds)) is None:
        if time.monotonic() >= deadline:
            return Delivery(0, 0, cursors.position(engine, name), busy=True)
        sleep(_POLL_SECONDS)
    sent = batches = overdue = 0

    def room() -> int:
        return batch_size if max_events is None else min(batch_size, max_events - sent)

    def send_batch(batch: list[OutcomeEvent]) -> None:
        try:
            send(batch)
        except Exception as exc:
            raise DeliveryFailed(
                f"sending {len(batch)} outcome events failed after {sent} were sent: "
                f"{type(exc).__name__}: {exc}", Delivery(sent, batches, position, overdue=overdue),
            ) from exc

    def taken_over(batch: list[OutcomeEvent]) -> DeliveryFailed:
        return DeliveryFailed(
            f"cursor {name!r} was taken over (its lease of {lease_seconds:g} s ran out): the "
            f"last {len(batch)} outcome events may be sent twice",
            Delivery(sent, batches, position, overdue=overdue),
        )

    try:
        horizon = settled_horizon(engine, position, settle_seconds=settle_seconds, sleep=sleep)
        while horizon > position and room() > 0:
            limit = room()
            with read_only(engine) as conn:
                batch = final_outcomes(conn, position, horizon, limit)
            reached = horizon if len(batch) < limit else batch[-1].audit_id or horizon
            if batch:
                send_batch(batch)
            if not cursors.advance(engine, name, owner, position, reached, len(batch),
                                   clock(), lease_seconds):
                raise taken_over(batch)
            position, sent, batches = reached, sent + len(batch), batches + bool(batch)
            if position == horizon:  # what was written meanwhile, in the same call
                horizon = settled_horizon(engine, position, settle_seconds=settle_seconds,
                                          sleep=sleep)
        while room() > 0:
            limit = room()
            with read_only(engine) as conn:
                batch = overdue_outcomes(conn, limit)
            if not batch:
                break
            send_batch(batch)
            sent_now = [(o.uuid, o.due_at) for o in batch]
            if not cursors.mark_overdue_sent(engine, name, owner, sent_now, clock(),
                                             lease_seconds):
                raise taken_over(batch)
            sent, batches, overdue = sent + len(batch), batches + 1, overdue + len(batch)
            if len(batch) < limit:
                break
    finally:
        cursors.release(engine, name, owner, clock())
    return Delivery(sent, batches, position, overdue=overdue)


def pending(engine: Engine, name: str = PREFECT, *, limit: int = 100) -> list[OutcomeEvent]:
    """What ``deliver`` would send next, as far as is committed now (read-only: a dry run;
    at most ``limit``): final states past the cursor, then overdue transactions."""
    limit = check_limit(limit, MAX_BATCH)
    position = cursors.position(engine, name)
    with read_only(engine) as conn:
        newest = conn.execute(sa.select(sa.func.max(EVENT.c.id))).scalar() or 0
        found = final_outcomes(conn, position, newest, limit)
        if len(found) < limit:
            found += overdue_outcomes(conn, limit - len(found))
    return found


def cursor_state(engine: Engine, name: str = PREFECT) -> CursorState:
    """Where cursor ``name`` is, and how many outcomes are not sent yet (read-only)."""
    v, sent = V_OVERDUE, SENT_OVERDUE
    with read_only(engine) as conn:
        row = conn.execute(sa.select(CURSOR).where(CURSOR.c.name == name)).one_or_none()
        newest = conn.execute(sa.select(sa.func.max(EVENT.c.id))).scalar() or 0
        position = row.last_event_id if row is not None else 0
        finals = conn.execute(
            sa.select(sa.func.count()).select_from(_OUTCOMES.subquery()),
            {"b_after": position, "b_upto": newest, "b_limit": 2**62},
        ).scalar()
        overdue = conn.execute(
            sa.select(sa.func.count()).select_from(v)
            .outerjoin(sent, sa.and_(sent.c.uuid == v.c.uuid, sent.c.due_at == v.c.due_at))
            .where(sent.c.uuid.is_(None))
        ).scalar()
    return CursorState(
        name=name, position=position, newest_event_id=newest,
        owner=None if row is None else row.owner,
        lease_expires_at=None if row is None else row.lease_expires_at,
        sent=0 if row is None else row.sent, updated_at=None if row is None else row.updated_at,
        pending=finals or 0, pending_overdue=overdue or 0,
    )
