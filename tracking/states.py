"""The state machine of stages and transactions, declared in one place.

The tables say which moves exist; the named sets say what "runnable", "waiting", "final" and
"requeuable" mean for every writer (the store), every reader (reports, SQL views, the API)
and every front end. ``decide`` is the rule for an attempt's result: pure, so it is tested
without a database.

Example:
    >>> from datetime import UTC, datetime
    >>> from tracking.outcomes import ExecutionResult
    >>> from tracking.policy import RetryPolicy
    >>> facts = StageFacts(attempt=1, attempts_allowed=3, is_last=False)
    >>> t = decide(facts, TxState.IN_PROGRESS, ExecutionResult(-1, "timeout"),
    ...            RetryPolicy(delay=60), datetime(2026, 1, 1, tzinfo=UTC))
    >>> t.stage_state.value, t.tx_state.value, t.next_attempt_at.isoformat()
    ('TERMINATED', 'TERMINATED', '2026-01-01T00:01:00+00:00')
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tracking.errors import InvalidTransition
from tracking.models import StageState, TxState
from tracking.outcomes import ExecutionResult, Outcome
from tracking.policy import RetryPolicy

S, T = StageState, TxState

# -- stages ------------------------------------------------------------------------------

#: Every move a stage can make. IN_PROGRESS covers "reserved" (no attempt started yet) and
#: "running"; a reservation given back returns to PENDING or TERMINATED; requeue reopens a
#: stopped stage as PENDING.
STAGE_TRANSITIONS: dict[StageState, frozenset[StageState]] = {
    S.PENDING: frozenset({S.IN_PROGRESS, S.CANCELLED}),
    S.IN_PROGRESS: frozenset(
        {S.COMPLETED, S.REJECTED, S.TERMINATED, S.EXHAUSTED, S.CANCELLED, S.PENDING}
    ),
    S.TERMINATED: frozenset({S.IN_PROGRESS, S.CANCELLED, S.PENDING}),
    S.REJECTED: frozenset({S.PENDING}),
    S.EXHAUSTED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING}),
    S.COMPLETED: frozenset(),
}
#: States a stage can be claimed from (when due and every earlier stage is COMPLETED).
RUNNABLE_STAGE_STATES = frozenset({S.PENDING, S.TERMINATED})
#: States a stage never leaves by itself (only an operator's requeue reopens them).
FINAL_STAGE_STATES = frozenset({S.COMPLETED, S.REJECTED, S.EXHAUSTED, S.CANCELLED})

# -- transactions ------------------------------------------------------------------------

TX_TRANSITIONS: dict[TxState, frozenset[TxState]] = {
    T.PENDING: frozenset({T.IN_PROGRESS, T.COMPLETED, T.REJECTED, T.TERMINATED, T.EXHAUSTED,
                          T.CANCELLED}),
    T.IN_PROGRESS: frozenset({T.COMPLETED, T.REJECTED, T.TERMINATED, T.EXHAUSTED, T.CANCELLED,
                              T.IN_PROGRESS}),
    T.TERMINATED: frozenset({T.IN_PROGRESS, T.COMPLETED, T.REJECTED, T.TERMINATED, T.EXHAUSTED,
                             T.CANCELLED}),
    T.REJECTED: frozenset({T.PENDING, T.IN_PROGRESS}),
    T.EXHAUSTED: frozenset({T.PENDING, T.IN_PROGRESS}),
    T.CANCELLED: frozenset({T.PENDING, T.IN_PROGRESS, T.CANCELLED}),
    T.COMPLETED: frozenset(),
}
#: A transaction that is done: nothing more happens unless an operator requeues it.
FINAL_TX_STATES = frozenset({T.COMPLETED, T.REJECTED, T.EXHAUSTED, T.CANCELLED})
#: A transaction still waiting for work (shown by the aging reports).
WAITING_TX_STATES = frozenset({T.PENDING, T.IN_PROGRESS, T.TERMINATED})
#: A stopped transaction an operator may give another go.
REQUEUABLE_TX_STATES = frozenset({T.EXHAUSTED, T.TERMINATED, T.REJECTED, T.CANCELLED})


def in_order(states: Iterable[StageState | TxState]) -> list[str]:
    """State names in the order of the enum (for reports and SQL ``IN`` lists)."""
    wanted = set(states)
    enum = type(next(iter(wanted))) if wanted else StageState
    return [s.value for s in enum if s in wanted]


# -- the rule for an attempt's result ---------------------------------------------------


@dataclass(frozen=True)
class StageFacts:
    """What ``decide`` needs to know of the stage an attempt was made on.

    Attributes:
        attempt: the number of the attempt whose result is being recorded (already counted).
        attempts_allowed: the stage's cap on attempts (None: unlimited).
        is_last: no stage of the transaction comes after this one.
    """

    attempt: int
    attempts_allowed: int | None
    is_last: bool


@dataclass(frozen=True)
class Transition:
    """Where an attempt's result takes the stage and its transaction.

    Attributes:
        stage_state, tx_state: the new states.
        next_attempt_at: when the stage is runnable again (None: not by itself).
        finished: the stage reached a final state now.
        unlock_next: the next stage becomes runnable now.
        cancel_rest: the transaction's other open stages are cancelled.
    """

    stage_state: StageState
    tx_state: TxState
    next_attempt_at: datetime | None = None
    finished: bool = False
    unlock_next: bool = False
    cancel_rest: bool = False


def decide(
    stage: StageFacts,
    tx_state: TxState,
    result: ExecutionResult,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random | None = None,
) -> Transition:
    """The transition an attempt's result makes (complete, or a lost attempt's expiry).

    Success moves on to the next stage (or completes the transaction); a business error
    rejects the transaction and cancels what is left; a system error retries after the
    policy's delay until ``attempts_allowed`` is used up. An operator's cancel stands even if
    an attempt that was already running finishes afterwards.
    """
    if result.outcome == Outcome.SUCCESS:
        t = Transition(
            S.COMPLETED,
            T.COMPLETED if stage.is_last else T.IN_PROGRESS,
            finished=True,
            unlock_next=not stage.is_last,
        )
    elif result.outcome == Outcome.BUSINESS_ERROR:
        t = Transition(S.REJECTED, T.REJECTED, finished=True, cancel_rest=True)
    elif stage.attempts_allowed is not None and stage.attempt >= stage.attempts_allowed:
        t = Transition(S.EXHAUSTED, T.EXHAUSTED, finished=True)
    else:
        delay = policy.delay_after(stage.attempt, rng)
        t = Transition(S.TERMINATED, T.TERMINATED, next_attempt_at=now + timedelta(seconds=delay))
    if tx_state == T.CANCELLED:
        if t.next_attempt_at is not None:
            return Transition(S.CANCELLED, T.CANCELLED, finished=True)
        return Transition(t.stage_state, T.CANCELLED, finished=t.finished)
    return t


# -- operator actions ----------------------------------------------------------------------


def check_cancel(uuid: str, tx_state: TxState) -> TxState:
    """The state a cancel leads to (``InvalidTransition`` for a final transaction)."""
    if tx_state in FINAL_TX_STATES:
        raise InvalidTransition(f"transaction {uuid} is already {tx_state.value}")
    return T.CANCELLED


@dataclass(frozen=True)
class StageSnapshot:
    """A stage as requeue sees it."""

    state: StageState
    started: bool


def check_requeue(uuid: str, tx_state: TxState, stages: Iterable[StageSnapshot]) -> TxState:
    """The state a requeue leads to (``InvalidTransition`` when it is not allowed).

    Only stopped transactions (``REQUEUABLE_TX_STATES``) with a stage left to run, and none
    running right now, can be requeued; completed stages are kept, so the transaction is
    IN_PROGRESS again when some stage had completed, else PENDING.
    """
    stages = list(stages)
    if tx_state not in REQUEUABLE_TX_STATES:
        raise InvalidTransition(
            f"transaction {uuid} is {tx_state.value}: only stopped transactions "
            f"({', '.join(in_order(REQUEUABLE_TX_STATES))}) can be requeued"
        )
    if any(s.state == S.IN_PROGRESS and s.started for s in stages):
        raise InvalidTransition(f"transaction {uuid} has a stage running right now")
    if all(s.state == S.COMPLETED for s in stages):
        # A cancel that raced the last stage's running attempt: nothing is left.
        raise InvalidTransition(
            f"transaction {uuid} is {tx_state.value} but every stage is COMPLETED: "
            "nothing left to run"
        )
    return T.IN_PROGRESS if any(s.state == S.COMPLETED for s in stages) else T.PENDING


def check_defer(uuid: str, tx_state: TxState, stages: Iterable[StageSnapshot]) -> None:
    """Refuse a defer (``InvalidTransition``) unless the transaction is waiting
    (``WAITING_TX_STATES``) and none of its stages is claimed or running right now."""
    if tx_state not in WAITING_TX_STATES:
        raise InvalidTransition(
            f"transaction {uuid} is {tx_state.value}: only waiting transactions "
            f"({', '.join(in_order(WAITING_TX_STATES))}) can be deferred"
        )
    for s in stages:
        if s.state == S.IN_PROGRESS:
            doing = "running" if s.started else "claimed by a run"
            raise InvalidTransition(f"transaction {uuid} has a stage {doing} right now: "
                                    "defer it once that attempt is recorded")


def deferred_until(next_attempt_at: datetime | None, until: datetime) -> datetime:
    """When a deferred stage is due: ``until``, or its later retry time if it has one (a
    defer postpones, it never brings an attempt forward)."""
    return until if next_attempt_at is None else max(next_attempt_at, until)


def released_state(had_error: bool) -> StageState:
    """Where a reservation given back goes: TERMINATED when its last attempt left a system
    error, else PENDING (never tried)."""
    return S.TERMINATED if had_error else S.PENDING


__all__ = [
    "FINAL_STAGE_STATES",
    "FINAL_TX_STATES",
    "REQUEUABLE_TX_STATES",
    "RUNNABLE_STAGE_STATES",
    "STAGE_TRANSITIONS",
    "TX_TRANSITIONS",
    "WAITING_TX_STATES",
    "StageFacts",
    "StageSnapshot",
    "Transition",
    "check_cancel",
    "check_defer",
    "check_requeue",
    "decide",
    "deferred_until",
    "in_order",
    "released_state",
]
