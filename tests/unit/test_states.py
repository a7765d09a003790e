"""The state machine, without a database: ``decide`` and the operator rules."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from tracking import ExecutionResult, InvalidTransition, RetryPolicy, StageState, TxState
from tracking.states import (
    FINAL_STAGE_STATES,
    FINAL_TX_STATES,
    REQUEUABLE_TX_STATES,
    RUNNABLE_STAGE_STATES,
    STAGE_TRANSITIONS,
    TX_TRANSITIONS,
    WAITING_TX_STATES,
    StageFacts,
    StageSnapshot,
    check_cancel,
    check_defer,
    check_requeue,
    decide,
    deferred_until,
)

NOW = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
S, T = StageState, TxState


def _decide(code, *, attempt=1, allowed=None, last=False, tx=T.IN_PROGRESS, policy=None):
    return decide(StageFacts(attempt, allowed, last), tx, ExecutionResult(code, "x"),
                  policy or RetryPolicy(), NOW, random.Random(1))


def test_success_unlocks_the_next_stage_or_completes_the_transaction():
    t = _decide(0)
    assert (t.stage_state, t.tx_state, t.unlock_next, t.finished) == (
        S.COMPLETED, T.IN_PROGRESS, True, True)
    t = _decide(0, last=True)
    assert (t.stage_state, t.tx_state, t.unlock_next) == (S.COMPLETED, T.COMPLETED, False)


def test_business_error_rejects_and_cancels_the_rest_even_with_attempts_left():
    t = _decide(4, attempt=1, allowed=5)
    assert (t.stage_state, t.tx_state, t.cancel_rest, t.next_attempt_at) == (
        S.REJECTED, T.REJECTED, True, None)


def test_system_error_retries_after_the_policy_delay_until_attempts_are_used():
    policy = RetryPolicy(delay=60, backoff=2)
    t = _decide(-1, attempt=2, allowed=3, policy=policy)
    assert (t.stage_state, t.tx_state) == (S.TERMINATED, T.TERMINATED)
    assert t.next_attempt_at == NOW + timedelta(seconds=120)
    t = _decide(-1, attempt=3, allowed=3, policy=policy)
    assert (t.stage_state, t.tx_state, t.next_attempt_at, t.finished) == (
        S.EXHAUSTED, T.EXHAUSTED, None, True)


def test_unlimited_attempts_never_exhaust():
    assert _decide(-1, attempt=10_000, allowed=None).stage_state == S.TERMINATED


def test_an_operators_cancel_stands_when_a_running_attempt_finishes():
    t = _decide(-1, attempt=1, allowed=3, tx=T.CANCELLED)
    assert (t.stage_state, t.tx_state, t.next_attempt_at) == (S.CANCELLED, T.CANCELLED, None)
    t = _decide(0, tx=T.CANCELLED)
    assert (t.stage_state, t.tx_state, t.unlock_next) == (S.COMPLETED, T.CANCELLED, False)


def test_every_outcome_lands_on_a_declared_move():
    for code in (0, 3, -1):
        for allowed in (None, 1, 5):
            for last in (False, True):
                t = _decide(code, allowed=allowed, last=last)
                assert t.stage_state in STAGE_TRANSITIONS[S.IN_PROGRESS]
                assert t.tx_state in TX_TRANSITIONS[T.IN_PROGRESS]
                assert (t.next_attempt_at is not None) == (t.stage_state in RUNNABLE_STAGE_STATES)
                assert t.finished == (t.stage_state in FINAL_STAGE_STATES)


def test_named_sets_partition_the_transaction_states():
    assert FINAL_TX_STATES | WAITING_TX_STATES == set(TxState)
    assert not FINAL_TX_STATES & WAITING_TX_STATES
    assert REQUEUABLE_TX_STATES == (FINAL_TX_STATES - {T.COMPLETED}) | {T.TERMINATED}
    assert STAGE_TRANSITIONS[S.COMPLETED] == frozenset()


def test_cancel_refuses_final_transactions():
    assert check_cancel("u", T.TERMINATED) == T.CANCELLED
    for state in FINAL_TX_STATES:
        with pytest.raises(InvalidTransition, match=f"already {state.value}"):
            check_cancel("u", state)


def test_requeue_rules():
    done, stopped = StageSnapshot(S.COMPLETED, True), StageSnapshot(S.EXHAUSTED, True)
    assert check_requeue("u", T.EXHAUSTED, [done, stopped]) == T.IN_PROGRESS
    assert check_requeue("u", T.REJECTED, [StageSnapshot(S.REJECTED, True)]) == T.PENDING
    with pytest.raises(InvalidTransition, match="only stopped transactions"):
        check_requeue("u", T.IN_PROGRESS, [stopped])
    with pytest.raises(InvalidTransition, match="running right now"):
        check_requeue("u", T.CANCELLED, [StageSnapshot(S.IN_PROGRESS, True)])
    with pytest.raises(InvalidTransition, match="nothing left to run"):
        check_requeue("u", T.CANCELLED, [done, done])


def test_defer_rules():
    waiting = StageSnapshot(S.PENDING, False)
    for state in WAITING_TX_STATES:
        check_defer("u", state, [StageSnapshot(S.COMPLETED, True), waiting])
    for state in FINAL_TX_STATES:
        with pytest.raises(InvalidTransition, match="only waiting transactions"):
            check_defer("u", state, [waiting])
    with pytest.raises(InvalidTransition, match="running right now"):
        check_defer("u", T.IN_PROGRESS, [StageSnapshot(S.IN_PROGRESS, True)])
    with pytest.raises(InvalidTransition, match="claimed by a run right now"):
        check_defer("u", T.PENDING, [StageSnapshot(S.IN_PROGRESS, False)])
    later = NOW + timedelta(hours=1)
    assert deferred_until(None, later) == later
    assert deferred_until(NOW, later) == later
    assert deferred_until(later + timedelta(hours=1), later) == later + timedelta(hours=1)
