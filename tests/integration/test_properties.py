"""Property-based tests (Hypothesis): outcomes, retry schedules, and the store as a state machine.

1. Error codes: every int maps to its outcome; nothing else is accepted or coerced.
2. RetryPolicy: the schedule formula, its bounds, monotonicity, and input validation.
3. ``TrackerMachine``: random sequences of intake, claims (by three owners), starts,
   completions (codes 0, 3, -1), clock jumps past leases, renewals, extensions, releases,
   lease recovery, cancels, requeues, and calls the store must refuse (stale workers,
   operators out of turn), against the real ``Tracker``: a fresh SQLite file per example,
   and PostgreSQL too when ``TRACKING_TEST_POSTGRES_URL`` is set. A Python model predicts
   every call's result and every stage, transaction and audit event; after each step the
   database is compared with the model, and these invariants are checked on the database
   alone:

   * ``attempt <= attempts_allowed`` when set;
   * an IN_PROGRESS stage has a lease owner and a lease, no other stage has a lease; at most
     one stage per transaction is IN_PROGRESS or runnable, and it is the first unfinished one;
   * a stage reserved by X and then started is started by X (and its attempt recorded as X's);
     a refused call changes nothing at all;
   * the ATTEMPT/LEASE_EXPIRED events of a stage are numbered 1..k, and its counter is k
     (k + 1 while a started attempt is running); RELEASED events never move the counter;
   * a stage that is not IN_PROGRESS is in the state its events left it in;
   * events are append-only: no row ever changes or disappears;
   * a transaction's state follows from its stages (and from the last operator action).

The last tests are the machine's findings as plain examples. ``TRACKING_PROPERTY_EXAMPLES``
sets the machine's number of examples (default 200 on SQLite, about 25 s; three quarters of
it on PostgreSQL, about 45 s; a failure takes up to five minutes more to shrink, and Hypothesis
replays it first next time). ``pytest -s`` prints what the runs exercised.
"""

from __future__ import annotations

import atexit
import enum
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import event as _event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import TABLES, FakeClock, cancellation_process
from tracking import (
    BusinessError,
    ExecutionResult,
    InvalidTransition,
    LeaseLost,
    RetryPolicy,
    StageState,
    SystemFailure,
    Tracker,
    TxState,
    connect,
)
from tracking import policy as policy_module
from tracking.connections import read_only
from tracking.models import (
    EventKind,
    TxEvent,
    TxProcess,
    TxStage,
)
from tracking.outcomes import (
    ErrorType,
    Outcome,
    check_error_code,
    outcome_of,
    result_from_exception,
    to_result,
)
from tracking.reports import Reports
from tracking.states import FINAL_TX_STATES
from tracking.states import RUNNABLE_STAGE_STATES as OPEN_STAGE_STATES

# -- 1. error codes ----------------------------------------------------------------------------

NOT_INT_CODES = st.one_of(
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.from_regex(r"-?[0-9]{1,4}", fullmatch=True),  # digits in a string are not a code
    st.none(),
    st.binary(max_size=4),
    st.decimals(allow_nan=False),
    st.fractions(),
    st.complex_numbers(),
    st.lists(st.integers(), max_size=2),
)


def _expected_outcome(code: int) -> Outcome:
    if code == 0:
        return Outcome.SUCCESS
    return Outcome.BUSINESS_ERROR if code > 0 else Outcome.SYSTEM_ERROR


@given(st.integers())
def test_every_int_code_maps_to_its_outcome(code):
    expected = _expected_outcome(code)
    assert outcome_of(code) == expected
    result = to_result(code)
    assert result == ExecutionResult(code) and result.outcome == expected
    assert type(result.error_code) is int and result.error_code == code  # kept as given
    assert result.error_type == {
        Outcome.SUCCESS: None,
        Outcome.BUSINESS_ERROR: ErrorType.BUSINESS,
        Outcome.SYSTEM_ERROR: ErrorType.SYSTEM,
    }[expected]
    described = ExecutionResult(code, "why")
    assert to_result(described) is described  # a result passes through untouched


@given(NOT_INT_CODES)
def test_a_code_that_is_not_an_int_is_refused_not_coerced(value):
    for convert in (check_error_code, outcome_of, to_result, ExecutionResult):
        with pytest.raises(TypeError):
            convert(value)


@pytest.mark.parametrize("value", [True, False])
def test_bools_are_not_codes(value):
    # True == 1 and isinstance(True, int): exactly what must not become business error 1.
    with pytest.raises(TypeError, match="bool"):
        to_result(value)
    with pytest.raises(TypeError):
        ExecutionResult(value, "looks like a code")


@given(st.integers(min_value=1), st.integers(max_value=-1), st.text(max_size=20))
def test_raised_errors_map_to_their_outcomes(business, system, message):
    assert result_from_exception(BusinessError(business, message)).outcome == (
        Outcome.BUSINESS_ERROR
    )
    assert result_from_exception(SystemFailure(system, message)).error_code == system
    other = result_from_exception(RuntimeError(message))
    assert (other.error_code, other.outcome) == (-1, Outcome.SYSTEM_ERROR)
    assert other.traceback is not None
    with pytest.raises(ValueError):
        BusinessError(-business)
    with pytest.raises(ValueError):
        SystemFailure(-system)
    with pytest.raises(TypeError):
        BusinessError(True)


# -- 2. retry schedules ------------------------------------------------------------------------

SECONDS = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
# backoff ** (attempt - 1) stays well inside a float for the attempts drawn with it.
BACKOFF = st.floats(min_value=1, max_value=10, allow_nan=False, allow_infinity=False)


@st.composite
def policies(draw, jitter=None):
    return RetryPolicy(
        max_attempts=draw(st.none() | st.integers(1, 100)),
        delay=draw(SECONDS | st.builds(lambda s: timedelta(seconds=s), SECONDS)),
        backoff=draw(BACKOFF | st.integers(1, 10)),
        max_delay=draw(st.none() | SECONDS),
        jitter=draw(st.floats(0, 1e3) if jitter is None else st.just(jitter)),
    )


# The policy may cap every delay at a few years (a retry due later than that is no retry, and
# a datetime cannot go past year 9999); none without such a constant.
LONGEST_DELAY = getattr(policy_module, "MAX_DELAY_SECONDS", math.inf)


def _exact_delay(policy: RetryPolicy, attempt: int) -> Fraction:
    """min(max_delay, delay * backoff ** (attempt - 1)) in exact arithmetic."""
    seconds = Fraction(policy.delay) * Fraction(policy.backoff) ** (attempt - 1)
    if policy.max_delay is not None:
        seconds = min(seconds, Fraction(policy.max_delay))
    if LONGEST_DELAY != math.inf:
        seconds = min(seconds, Fraction(LONGEST_DELAY))
    return seconds


def _close(a: float, b: float | Fraction) -> bool:
    return math.isclose(a, float(b), rel_tol=1e-9, abs_tol=1e-9)


@given(policies(), st.integers(1, 60), st.integers(0, 2**32))
def test_delay_follows_the_formula_within_the_jitter(policy, attempt, seed):
    delay = policy.delay_after(attempt, random.Random(seed))
    expected = _exact_delay(policy, attempt)
    low, high = max(0, expected - Fraction(policy.jitter)), expected + Fraction(policy.jitter)
    assert delay >= 0
    assert low <= Fraction(delay) <= high or _close(delay, low) or _close(delay, high)
    assert delay == policy.delay_after(attempt, random.Random(seed))  # the rng decides
    if policy.jitter == 0:
        assert _close(delay, expected)


@given(policies(jitter=0))
def test_without_jitter_the_delay_never_shrinks(policy):
    delays = [policy.delay_after(n) for n in range(1, 61)]
    assert delays == sorted(delays)
    if policy.max_delay is not None:
        assert max(delays) <= policy.max_delay


@given(policies(jitter=0).filter(lambda p: p.max_delay is not None), st.integers(1, 5000))
def test_a_capped_delay_is_the_cap_however_many_attempts_were_made(policy, attempt):
    # Unlimited max_attempts + backoff + max_delay is the usual policy for a flaky platform:
    # attempt 310 of backoff 10 (or 1025 of backoff 2) is still a delay of max_delay.
    assert _close(policy.delay_after(attempt), _exact_delay(policy, attempt))


NEGATIVE = st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=True)

INVALID_POLICIES = st.one_of(
    st.builds(lambda v: {"delay": v}, NEGATIVE),
    st.builds(lambda v: {"delay": timedelta(seconds=v)}, st.floats(-1e6, -1e-3)),
    st.builds(lambda v: {"max_delay": v}, NEGATIVE),
    st.builds(lambda v: {"jitter": v}, NEGATIVE),
    st.builds(lambda v: {"backoff": v}, st.floats(max_value=0.999999, allow_nan=False)),
    st.builds(lambda v: {"backoff": v}, st.booleans() | st.text(max_size=3) | st.none()),
    st.builds(lambda v: {"max_attempts": v}, st.integers(max_value=0)),
    st.builds(lambda v: {"max_attempts": v}, st.booleans() | st.floats() | st.text(max_size=3)),
)


@given(INVALID_POLICIES)
def test_an_invalid_policy_is_refused(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@given(st.sampled_from(["delay", "max_delay", "jitter"]), st.booleans() | st.text(max_size=3))
def test_a_duration_that_is_not_a_number_is_a_type_error(name, value):
    with pytest.raises(TypeError):
        RetryPolicy(**{name: value})


@given(policies(), st.integers(max_value=0))
def test_attempts_are_numbered_from_one(policy, attempt):
    with pytest.raises(ValueError):
        policy.delay_after(attempt)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["delay", "backoff", "max_delay", "jitter"])
def test_a_non_finite_policy_value_is_refused(name, value):
    # NaN passes ``value < 0`` / ``b < 1`` (every comparison with NaN is false), and then
    # delay_after silently returns 0.0 (max(0.0, nan)): a policy that retries at once for
    # ever. An infinite delay is no date: ``now + timedelta(seconds=inf)`` raises in the store.
    with pytest.raises(ValueError):
        RetryPolicy(**{name: value})


# -- 3. the store as a state machine -----------------------------------------------------------

P = "CANCELLATION"
STAGE_KEYS = (("A", "validate"), ("B", "process"), ("B", "confirm"), ("C", "main"))
MAX_ATTEMPTS = {"A": 1, "B": 2, "C": None}
OWNERS = ("w1", "w2", "w3")
LEASES = (5, 30, 120)
CODES = (0, 0, 3, -1)  # success twice as likely, so transactions get far
MAX_OPEN_TRANSACTIONS = 3  # not final: few at a time, so that each gets far
ATTEMPT_KINDS = (EventKind.ATTEMPT, EventKind.LEASE_EXPIRED)
STOPPED = (TxState.EXHAUSTED, TxState.TERMINATED, TxState.REJECTED, TxState.CANCELLED)

STAGE = TxStage.__table__
TX = TxProcess.__table__
EVENT = TxEvent.__table__
EVENT_FIELDS = ("uuid", "kind", "platform", "stage", "attempt", "outcome", "error_code",
                "from_state", "to_state", "tx_state", "actor")


STATS: Counter[str] = Counter()


def event(text: str) -> None:
    """A Hypothesis event, also counted in STATS (printed by the machine's test)."""
    _event(text)
    STATS[text] += 1


def _v(x: Any) -> Any:
    return x.value if isinstance(x, enum.Enum) else x


@dataclass
class MStage:
    """The model of one stage row."""

    id: int
    uuid: str
    seq: int
    platform: str
    stage: str
    state: StageState = StageState.PENDING
    attempt: int = 0
    allowed: int | None = None
    next_at: datetime | None = None
    owner: str | None = None  # lease_owner: the holder while IN_PROGRESS, else the last one
    lease: datetime | None = None  # lease_expires_at: set only while IN_PROGRESS
    started: bool = False  # IN_PROGRESS and its attempt started
    error_code: int | None = None

    def __repr__(self) -> str:
        return (f"<stage {self.platform}.{self.stage} of {self.uuid[:8]}: {self.state.value}, "
                f"attempt {self.attempt}, owner {self.owner}>")

    def _repr_pretty_(self, p, cycle) -> None:  # how Hypothesis prints a draw
        p.text(repr(self))

    @property
    def key(self) -> tuple[str, str]:
        return self.platform, self.stage

    @property
    def reserved(self) -> bool:
        return self.state == StageState.IN_PROGRESS and not self.started

    @property
    def running(self) -> bool:
        return self.state == StageState.IN_PROGRESS and self.started


@dataclass
class MTx:
    uuid: str
    request_id: str
    state: TxState = TxState.PENDING
    stages: list[MStage] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<transaction {self.request_id} ({self.uuid[:8]}): {self.state.value}>"

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(repr(self))


# A RAM disk when there is one: the machine writes a few hundred small transactions per example.
TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


_TEMPLATE: list[str] = []


def _fresh_sqlite() -> tuple[str, Any]:
    """A new SQLite file: a copy of one migrated once (migrating costs more than a run)."""
    if not _TEMPLATE:
        directory = tempfile.mkdtemp(prefix="tracking-props-template-", dir=TMP)
        atexit.register(shutil.rmtree, directory, True)
        connect(f"sqlite:///{directory}/tracking.db", migrate=True).dispose()
        _TEMPLATE.append(f"{directory}/tracking.db")
    directory = tempfile.mkdtemp(prefix="tracking-props-", dir=TMP)
    shutil.copyfile(_TEMPLATE[0], f"{directory}/tracking.db")
    return f"sqlite:///{directory}/tracking.db", lambda: shutil.rmtree(directory, True)


def _fresh_postgres(url: str) -> tuple[str, Any]:
    """The session's PostgreSQL database, emptied (TRUNCATE fires no row trigger)."""
    engine = connect(url, migrate=True)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    engine.dispose()
    return url, lambda: None


_SELECT_STAGES = sa.select(STAGE)
_SELECT_TXS = sa.select(TX)
_SELECT_EVENTS = sa.select(EVENT).order_by(EVENT.c.id)


class TrackerMachine(RuleBasedStateMachine):
    """The real Tracker against a model of what every call must do."""

    fresh_database = staticmethod(_fresh_sqlite)

    def __init__(self) -> None:
        super().__init__()
        url, self._cleanup = self.fresh_database()
        self.clock = FakeClock()
        self.engine = connect(url, migrate=True)
        self.tracker = Tracker(self.engine, processes=[cancellation_process()], clock=self.clock)
        self.txs: dict[str, MTx] = {}
        self.by_request: dict[str, str] = {}
        self.next_request = 0
        self.expected_events: list[tuple] = []
        self.seen_events: dict[int, tuple] = {}
        self.prev_stages: dict[int, Any] = {}
        self.steps = 0

    def teardown(self) -> None:
        self.engine.dispose()
        self._cleanup()

    # -- the model ---------------------------------------------------------------------------

    @property
    def now(self) -> datetime:
        return self.clock.now

    def stages(self) -> list[MStage]:
        return [s for tx in self.txs.values() for s in tx.stages]

    def stage_of(self, stage_id: int) -> MStage:
        return next(s for s in self.stages() if s.id == stage_id)

    def _event(self, uuid, kind, *, s=None, outcome=None, code=None, from_state=None,
               to_state=None, actor=None, attempt=None) -> None:
        self.expected_events.append((
            uuid, kind.value, s.platform if s else None, s.stage if s else None,
            attempt, _v(outcome), code, _v(from_state), _v(to_state),
            self.txs[uuid].state.value, actor,
        ))

    def _runnable(self, s: MStage) -> bool:
        return s.next_at is not None and s.next_at <= self.now

    def _release(self, s: MStage) -> None:
        s.state = StageState.TERMINATED if s.error_code is not None else StageState.PENDING
        s.next_at, s.lease = self.now, None
        self._event(s.uuid, EventKind.RELEASED, s=s, attempt=s.attempt,
                    from_state=StageState.IN_PROGRESS, to_state=s.state, actor=s.owner)

    def _claim(self, s: MStage, owner: str, lease: float) -> None:
        assert s.state in OPEN_STAGE_STATES, s
        s.state, s.next_at, s.owner = StageState.IN_PROGRESS, None, owner
        s.lease, s.started = self.now + timedelta(seconds=lease), False

    def _apply(self, s: MStage, code: int, kind: EventKind, actor: str | None) -> None:
        tx = self.txs[s.uuid]
        from_state = s.state
        attempt = s.attempt if s.running else s.attempt + 1
        s.attempt, s.next_at, s.lease, s.started, s.error_code = attempt, None, None, False, code
        later = [x for x in tx.stages if x.seq > s.seq]
        outcome = outcome_of(code)
        if outcome == Outcome.SUCCESS:
            s.state = StageState.COMPLETED
            if later and later[0].state == StageState.PENDING:
                later[0].next_at = self.now
            new_state = TxState.IN_PROGRESS if later else TxState.COMPLETED
        elif outcome == Outcome.BUSINESS_ERROR:
            s.state = StageState.REJECTED
            for x in tx.stages:
                if x is not s and x.state in OPEN_STAGE_STATES:
                    x.state, x.next_at = StageState.CANCELLED, None
            new_state = TxState.REJECTED
        elif s.allowed is not None and attempt >= s.allowed:
            s.state, new_state = StageState.EXHAUSTED, TxState.EXHAUSTED
        else:  # the cancellation process has no retry delay: due again at once
            s.state, s.next_at, new_state = StageState.TERMINATED, self.now, TxState.TERMINATED
        if tx.state == TxState.CANCELLED:  # an operator's cancel stands
            new_state = TxState.CANCELLED
            if s.next_at is not None:
                s.state, s.next_at = StageState.CANCELLED, None
        tx.state = new_state
        self._event(s.uuid, kind, s=s, attempt=attempt, outcome=outcome, code=code,
                    from_state=from_state, to_state=s.state, actor=actor)

    def _recover(self, platform: str | None = None) -> int:
        """What recover_expired_leases does (also the first thing claim does)."""
        def expired(s: MStage) -> bool:
            return (s.state == StageState.IN_PROGRESS and s.lease <= self.now
                    and platform in (None, s.platform))

        released = [s for s in self.stages() if expired(s) and s.reserved]
        for s in released:
            self._release(s)
        lost = [s for s in self.stages() if expired(s) and s.running]
        for s in lost:
            self._apply(s, -1, EventKind.LEASE_EXPIRED, s.owner)
        return len(released) + len(lost)

    # -- reading the database ----------------------------------------------------------------

    def snapshot(self) -> tuple[dict[int, Any], dict[str, Any], dict[int, Any]]:
        with read_only(self.engine) as conn:
            stages = {r.id: r for r in conn.execute(_SELECT_STAGES)}
            txs = {r.uuid: r for r in conn.execute(_SELECT_TXS)}
            events = {r.id: r for r in conn.execute(_SELECT_EVENTS)}
        return stages, txs, events

    @staticmethod
    def _row(row: Any) -> tuple:
        return tuple(_v(x) for x in row)

    # -- rules -------------------------------------------------------------------------------

    @initialize(progress=st.lists(st.integers(0, len(STAGE_KEYS) - 1), max_size=3))
    def some_transactions_under_way(self, progress):
        """Start with transactions that got through their first ``k`` stages (so that runs
        reach the later stages within a few steps)."""
        for k in progress:
            self.intake(1, False, False, None)
            tx = list(self.txs.values())[-1]
            for s in tx.stages[:k]:
                self.tracker.complete_stage(s.uuid, s.platform, 0, stage=s.stage)
                self._apply(s, 0, EventKind.ATTEMPT, None)

    @precondition(lambda self: sum(tx.state not in FINAL_TX_STATES for tx in self.txs.values())
                  < MAX_OPEN_TRANSACTIONS)
    @rule(n=st.integers(1, 3), duplicate=st.booleans(), repeat=st.booleans(), data=st.data())
    def intake(self, n, duplicate, repeat, data):
        requests = [f"R{self.next_request + i}" for i in range(n)]
        self.next_request += n
        if repeat:
            requests.append(requests[0])  # the same item twice in one batch
        if duplicate and self.by_request:
            requests.insert(0, data.draw(st.sampled_from(sorted(self.by_request))))
        results = self.tracker.start_many(P, [{"request_id": r, "n": i}
                                              for i, r in enumerate(requests)])
        created: list[str] = []
        for request, result in zip(requests, results, strict=True):
            if request in self.by_request:
                assert (result.uuid, result.is_new) == (self.by_request[request], False)
            else:
                assert result.is_new
                self.by_request[request] = result.uuid
                created.append(result.uuid)
        with read_only(self.engine) as conn:
            rows = conn.execute(
                sa.select(STAGE.c.id, STAGE.c.uuid, STAGE.c.seq).where(STAGE.c.uuid.in_(created))
            ).all()
        for uuid in created:
            request = next(r for r, u in self.by_request.items() if u == uuid)
            tx = self.txs[uuid] = MTx(uuid, request)
            ids = {r.seq: r.id for r in rows if r.uuid == uuid}
            for seq, (platform, stage) in enumerate(STAGE_KEYS, start=1):
                tx.stages.append(MStage(
                    ids[seq], uuid, seq, platform, stage, allowed=MAX_ATTEMPTS[platform],
                    next_at=self.now if seq == 1 else None,
                ))
            self._event(uuid, EventKind.CREATED)

    @precondition(lambda self: any(self._runnable(s) or s.state == StageState.IN_PROGRESS
                                   for s in self.stages()))
    @rule(owner=st.sampled_from(OWNERS), limit=st.integers(1, 3), lease=st.sampled_from(LEASES),
          last_owner=st.booleans(), one_tx=st.booleans(), data=st.data())
    def claim(self, owner, limit, lease, last_owner, one_tx, data):
        runnable = [s for s in self.stages() if self._runnable(s)]
        platform, stage = data.draw(st.sampled_from(sorted({s.key for s in runnable})
                                                    or list(STAGE_KEYS)))
        runnable = [s for s in runnable if s.key == (platform, stage)]
        previous = [s.owner for s in runnable if s.owner is not None]
        if last_owner and previous:  # the run that made the last attempt (or gave it back)
            owner = previous[0]
        uuid = None
        if one_tx:
            uuid = data.draw(st.sampled_from([s.uuid for s in runnable] or list(self.txs)))
        self._claim_call(platform, stage, owner, limit, lease, uuid)

    def _claim_call(self, platform, stage, owner, limit, lease, uuid=None) -> None:
        self._recover(platform)
        candidates = sorted(
            (s for s in self.stages()
             if s.key == (platform, stage) and self._runnable(s) and s.owner != owner
             and uuid in (None, s.uuid)),
            key=lambda s: (s.next_at, s.id),
        )[:limit]
        for s in candidates:
            self._claim(s, owner, lease)
        got = self.tracker.claim(P, platform, stage, owner=owner, limit=limit,
                                 lease_seconds=lease, uuid=uuid)
        assert [s.id for s in got] == sorted(s.id for s in candidates), (
            f"claim({platform}.{stage}, owner={owner}, limit={limit}, uuid={uuid}) got "
            f"{[s.id for s in got]}, model {sorted(s.id for s in candidates)}"
        )
        for row in got:
            model = self.stage_of(row.id)
            assert (row.attempt, row.started_at, row.lease_owner) == (model.attempt, None, owner)
            assert row.transaction.uuid == row.uuid

    @precondition(lambda self: any(s.next_at is not None for s in self.stages()))
    @rule(owner=st.sampled_from(OWNERS), lease=st.sampled_from(LEASES), data=st.data())
    def claim_one_stage(self, owner, lease, data):
        """The in-run retry path: no due time, no owner check, no recovery first."""
        s = data.draw(st.sampled_from([s for s in self.stages() if s.next_at is not None]))
        got = self.tracker.claim_stage(s.uuid, s.platform, s.stage, owner=owner,
                                       lease_seconds=lease)
        self._claim(s, owner, lease)
        assert got is not None and got.id == s.id

    @precondition(lambda self: any(s.reserved for s in self.stages()))
    @rule(lease=st.sampled_from(LEASES), data=st.data())
    def start(self, lease, data):
        self._start(data.draw(st.sampled_from([s for s in self.stages() if s.reserved])), lease)

    def _start(self, s: MStage, lease: float) -> None:
        attempt = self.tracker.start_attempt(s.uuid, s.platform, s.stage, owner=s.owner,
                                             lease_seconds=lease)
        s.attempt, s.started, s.lease = s.attempt + 1, True, self.now + timedelta(seconds=lease)
        tx = self.txs[s.uuid]
        if tx.state in (TxState.PENDING, TxState.TERMINATED):
            tx.state = TxState.IN_PROGRESS
        assert attempt == s.attempt

    @precondition(lambda self: any(s.state == StageState.IN_PROGRESS for s in self.stages()))
    @rule(code=st.sampled_from(CODES), data=st.data())
    def complete(self, code, data):
        s = data.draw(st.sampled_from([s for s in self.stages()
                                       if s.state == StageState.IN_PROGRESS]))
        owner = s.owner
        got = self.tracker.complete_stage(s.uuid, s.platform, code, stage=s.stage, owner=owner)
        self._apply(s, code, EventKind.ATTEMPT, owner)
        assert (got.state, got.attempt) == (s.state, s.attempt)
        event(f"complete: {s.key} -> {s.state.value}, tx {self.txs[s.uuid].state.value}")

    # Hypothesis draws rules with few arguments more often (it orders them by the number of
    # arguments and favours the first valid one): this one, with none, moves the oldest item
    # on, so that runs reach the later stages and the other rules act on them on the way.

    @precondition(lambda self: any(s.state == StageState.IN_PROGRESS or self._runnable(s)
                                   for s in self.stages()))
    @rule()
    def progress(self):
        """A worker's next step with the oldest item: start what it reserved, finish what it
        started, or claim what is runnable. Stage B.process is flaky: every odd attempt at it
        is a system error (retried by another run), every even one succeeds."""
        held = [s for s in self.stages() if s.state == StageState.IN_PROGRESS]
        if held:
            s = min(held, key=lambda s: s.id)
            if s.reserved:
                self._start(s, 30)
            else:
                code = -1 if s.key == ("B", "process") and s.attempt % 2 else 0
                got = self.tracker.complete_stage(s.uuid, s.platform, code, stage=s.stage,
                                                  owner=s.owner)
                self._apply(s, code, EventKind.ATTEMPT, s.owner)
                assert got.state == s.state
            return
        s = min((s for s in self.stages() if self._runnable(s)), key=lambda s: (s.next_at, s.id))
        owner = next(o for o in OWNERS if o != s.owner)
        self._claim_call(s.platform, s.stage, owner, 1, 30)

    @precondition(lambda self: any(self._runnable(s) for s in self.stages()))
    @rule(code=st.sampled_from(CODES), data=st.data())
    def complete_unclaimed(self, code, data):
        """Completing a runnable stage nobody holds (an attempt counted now, no owner)."""
        s = data.draw(st.sampled_from([s for s in self.stages() if self._runnable(s)]))
        self.tracker.complete_stage(s.uuid, s.platform, code, stage=s.stage)
        self._apply(s, code, EventKind.ATTEMPT, None)

    @precondition(lambda self: any(s.state == StageState.IN_PROGRESS for s in self.stages()))
    @rule(seconds=st.sampled_from((1, 6, 31, 121)))  # leases are 5, 30 or 120 s
    def time_passes(self, seconds):
        self.clock.advance(seconds)

    @precondition(lambda self: any(s.reserved for s in self.stages()))
    @rule(owner=st.sampled_from(OWNERS), seconds=st.sampled_from(LEASES))
    def renew(self, owner, seconds):
        mine = [s for s in self.stages() if s.reserved and s.owner == owner]
        for s in mine:
            s.lease = self.now + timedelta(seconds=seconds)
        assert self.tracker.renew_reservations(P, owner=owner, seconds=seconds) == len(mine)

    @precondition(lambda self: any(s.state == StageState.IN_PROGRESS for s in self.stages()))
    @rule(seconds=st.sampled_from(LEASES), data=st.data())
    def extend(self, seconds, data):
        s = data.draw(st.sampled_from([s for s in self.stages()
                                       if s.state == StageState.IN_PROGRESS]))
        expires = self.tracker.extend_lease(s.uuid, s.platform, s.stage, owner=s.owner,
                                            seconds=seconds)
        s.lease = self.now + timedelta(seconds=seconds)
        assert expires == s.lease

    @precondition(lambda self: any(s.reserved for s in self.stages()))
    @rule(owner=st.sampled_from(OWNERS), holder=st.booleans(), some=st.booleans(),
          data=st.data())
    def release(self, owner, holder, some, data):
        if holder:  # mostly a run that holds something
            owner = data.draw(st.sampled_from(sorted({s.owner for s in self.stages()
                                                      if s.reserved})))
        uuids = None
        if some and self.txs:
            uuids = data.draw(st.lists(st.sampled_from(list(self.txs)), max_size=3))
        mine = [s for s in self.stages()
                if s.reserved and s.owner == owner and (uuids is None or s.uuid in uuids)]
        for s in mine:
            self._release(s)
        assert self.tracker.release(P, owner=owner, uuids=uuids) == len(mine)

    @precondition(lambda self: any(s.state == StageState.IN_PROGRESS for s in self.stages()))
    @rule(platform=st.sampled_from((None, "A", "B", "C")))
    def recover(self, platform):
        expected = self._recover(platform)
        event(f"recover: {min(expected, 2)}{'+' if expected > 1 else ''} stage(s)")
        assert self.tracker.recover_expired_leases(P, platform) == expected

    @precondition(lambda self: any(tx.state not in FINAL_TX_STATES for tx in self.txs.values()))
    @rule(data=st.data())
    def cancel(self, data):
        live = [tx for tx in self.txs.values() if tx.state not in FINAL_TX_STATES]
        running = [tx for tx in live if any(s.running for s in tx.stages)]
        tx = data.draw(st.sampled_from(running) | st.sampled_from(live) if running
                       else st.sampled_from(live))
        self.tracker.cancel(tx.uuid, reason="operator", actor="ops")
        event(f"cancel: {'a call running' if any(s.running for s in tx.stages) else 'idle'}")
        for s in tx.stages:
            if s.state in OPEN_STAGE_STATES or s.reserved:
                s.state, s.next_at, s.lease = StageState.CANCELLED, None, None
        before, tx.state = tx.state, TxState.CANCELLED
        self._event(tx.uuid, EventKind.CANCELLED, from_state=before,
                    to_state=TxState.CANCELLED, actor="ops")

    def _requeueable(self, tx: MTx) -> bool:
        return tx.state in STOPPED and not any(s.running for s in tx.stages)

    @precondition(lambda self: any(self._requeueable(tx) for tx in self.txs.values()))
    @rule(data=st.data())
    def requeue(self, data):
        tx = data.draw(st.sampled_from([tx for tx in self.txs.values() if self._requeueable(tx)]))
        if all(s.state == StageState.COMPLETED for s in tx.stages):
            # A cancel that raced the last stage's successful call: nothing is left to run,
            # so requeue refuses (it used to make the transaction IN_PROGRESS for ever).
            before = self.snapshot()
            with pytest.raises(InvalidTransition):
                self.tracker.requeue(tx.uuid, actor="ops")
            self._assert_unchanged(before, f"requeue of {tx} (every stage COMPLETED)")
            event("requeue: refused, every stage COMPLETED")
            return
        self.tracker.requeue(tx.uuid, actor="ops")
        event(f"requeue: {tx.state.value}")
        first = True
        for s in tx.stages:
            if s.state == StageState.COMPLETED:
                continue
            m = MAX_ATTEMPTS[s.platform]
            s.state, s.allowed = StageState.PENDING, None if m is None else s.attempt + m
            s.owner, s.lease, s.started, s.error_code = None, None, False, None
            s.next_at, first = (self.now if first else None), False
        before = tx.state
        done = any(s.state == StageState.COMPLETED for s in tx.stages)
        tx.state = TxState.IN_PROGRESS if done else TxState.PENDING
        self._event(tx.uuid, EventKind.REQUEUED, from_state=before, to_state=tx.state,
                    actor="ops")

    def _assert_unchanged(self, before, what: str) -> None:
        after = self.snapshot()
        for b, a in zip(before, after, strict=True):
            assert {k: self._row(r) for k, r in b.items()} == {
                k: self._row(r) for k, r in a.items()
            }, f"{what} changed the database"

    def _refused_calls(self) -> list[tuple[str, Any, str | None]]:
        """Calls the store must refuse, as (what, stage or transaction, owner)."""
        calls: list[tuple[str, Any, str | None]] = []
        for s in self.stages():
            for owner in OWNERS:
                if not (s.reserved and s.owner == owner):
                    calls.append(("start", s, owner))
                if not (s.state == StageState.IN_PROGRESS and s.owner == owner):
                    calls.append(("complete", s, owner))
                    calls.append(("extend", s, owner))
            if not self._runnable(s):
                calls.append(("complete", s, None))
            if s.next_at is None:
                calls.append(("claim_stage", s, "w1"))
        for tx in self.txs.values():
            if tx.state in FINAL_TX_STATES:
                calls.append(("cancel", tx, None))
            if not self._requeueable(tx):
                calls.append(("requeue", tx, None))
        return calls

    def _draw_refused_call(self, data, stale: bool) -> tuple[str, Any, str | None]:
        calls = self._refused_calls()
        if stale:  # mostly a run that did hold the stage once (lost or given back)
            previous = [c for c in calls if isinstance(c[1], MStage) and c[2] is not None
                        and c[1].owner is not None]
            calls = previous or calls
        op = data.draw(st.sampled_from(sorted({c[0] for c in calls})))  # each kind as likely
        return data.draw(st.sampled_from([c for c in calls if c[0] == op]))

    # Refusals are always possible: at most every third step, so they leave room for work.
    @precondition(lambda self: self.txs and self.steps % 3 == 0)
    @rule(code=st.sampled_from(CODES), stale=st.booleans(), data=st.data())
    def refused_call(self, code, stale, data):
        """A stale worker (one that does not hold the stage) or an operator acting out of turn
        is refused, and nothing changes."""
        op, x, owner = self._draw_refused_call(data, stale)
        before = self.snapshot()
        if op == "claim_stage":
            assert self.tracker.claim_stage(x.uuid, x.platform, x.stage, owner=owner) is None
        else:
            error = LeaseLost if owner is not None else InvalidTransition
            with pytest.raises(error):
                if op == "start":
                    self.tracker.start_attempt(x.uuid, x.platform, x.stage, owner=owner)
                elif op == "extend":
                    self.tracker.extend_lease(x.uuid, x.platform, x.stage, owner=owner,
                                              seconds=60)
                elif op == "complete":
                    self.tracker.complete_stage(x.uuid, x.platform, code, stage=x.stage,
                                                owner=owner)
                elif op == "cancel":
                    self.tracker.cancel(x.uuid, reason="operator")
                else:
                    self.tracker.requeue(x.uuid)
        event(f"refused: {op}" + (f" by {'a former holder' if owner == x.owner else 'another'}"
                                  if isinstance(x, MStage) and owner else ""))
        self._assert_unchanged(before, f"{op} by {owner!r} of {x}")

    # -- the checks --------------------------------------------------------------------------

    @invariant()
    def database_matches_model_and_invariants_hold(self) -> None:
        stages, txs, events = self.snapshot()
        self._check_against_model(stages, txs, events)
        self._check_events_append_only(events)
        self._check_stage_invariants(stages, txs, events)
        self._check_owner_fencing(stages, events)
        self._check_counts()
        self.prev_stages = stages
        self.seen_events = {i: self._row(r) for i, r in events.items()}
        self.steps += 1
        self.expected_events = []

    def _check_against_model(self, stages, txs, events) -> None:
        assert set(txs) == set(self.txs)
        for tx in self.txs.values():
            assert txs[tx.uuid].state == tx.state, (tx.uuid, txs[tx.uuid].state, tx)
            for s in tx.stages:
                row = stages[s.id]
                got = (row.state, row.attempt, row.attempts_allowed, row.next_attempt_at,
                       row.lease_owner, row.error_code)
                want = (s.state, s.attempt, s.allowed, s.next_at, s.owner, s.error_code)
                assert got == want, f"stage {s.key} of {s.uuid}: db {got} != model {want}"
                assert row.lease_expires_at == s.lease, (
                    f"stage {s.key} of {s.uuid} ({s.state.value}): lease in db "
                    f"{row.lease_expires_at}, model {s.lease}"
                )
                if s.state == StageState.IN_PROGRESS:
                    assert (row.started_at is not None) == s.started, (
                        f"stage {s.key} of {s.uuid}: started_at {row.started_at}, model {s}"
                    )
        new = [
            tuple(_v(getattr(e, f)) for f in EVENT_FIELDS)
            for i, e in events.items() if i not in self.seen_events
        ]
        assert Counter(new) == Counter(self.expected_events), (new, self.expected_events)

    def _check_counts(self) -> None:
        """The summary (pre-aggregated counts kept by triggers) agrees with the model: over
        a window past now (its edges counted from the rows) and over one that ends just
        after now (the current hour's count less the rows created after it)."""
        want = dict(Counter(tx.state for tx in self.txs.values()))
        reports = Reports(self.engine, self.clock)
        for start, end in ((self.now - timedelta(days=30), self.now + timedelta(days=1)),
                           (self.now - timedelta(days=30),
                            self.now + timedelta(microseconds=1))):
            got = {r.state: r.count for r in reports.summary_by_process_and_state(start, end)}
            assert got == want, (start, end, got, want)

    def _check_events_append_only(self, events) -> None:
        for i, row in self.seen_events.items():
            assert i in events, f"event {i} disappeared"
            assert self._row(events[i]) == row, f"event {i} changed"
        if self.seen_events:
            newest = max(self.seen_events)
            assert all(i > newest for i in events if i not in self.seen_events)

    def _check_stage_invariants(self, stages, txs, events) -> None:
        by_tx: dict[str, list[Any]] = {}
        for row in stages.values():
            by_tx.setdefault(row.uuid, []).append(row)
        events_of: dict[str, list[Any]] = {}
        for e in events.values():
            events_of.setdefault(e.uuid, []).append(e)
        for uuid, rows in by_tx.items():
            rows.sort(key=lambda r: r.seq)
            tx_events = sorted(events_of[uuid], key=lambda e: e.id)
            implied = self._states_implied_by(rows, tx_events)
            active = []
            for row in rows:
                label = f"stage {row.platform}.{row.stage} of {uuid}"
                if row.attempts_allowed is not None:
                    assert row.attempt <= row.attempts_allowed, label
                # Only a held stage has a lease (a lease left on another stage would be
                # "expired" for ever and fill recover_expired_leases' limit).
                if row.state == StageState.IN_PROGRESS:
                    assert row.lease_owner and row.lease_expires_at is not None, label
                else:
                    assert row.lease_expires_at is None, (label, row.state)
                if row.state == StageState.IN_PROGRESS or row.next_attempt_at is not None:
                    active.append(row)
                if row.next_attempt_at is not None:
                    assert row.state in OPEN_STAGE_STATES, label
                    assert row.attempts_allowed is None or row.attempt < row.attempts_allowed
                # Attempts are numbered 1..k; RELEASED never moves the counter.
                mine = [e for e in tx_events
                        if (e.platform, e.stage) == (row.platform, row.stage)]
                numbers = [e.attempt for e in mine if e.kind in ATTEMPT_KINDS]
                assert numbers == list(range(1, len(numbers) + 1)), (label, numbers)
                running = row.state == StageState.IN_PROGRESS and row.started_at is not None
                assert row.attempt == len(numbers) + running, (label, row.attempt, numbers)
                for e in mine:
                    if e.kind == EventKind.RELEASED:
                        before = sum(1 for x in mine if x.kind in ATTEMPT_KINDS and x.id < e.id)
                        assert e.attempt == before, (label, e.attempt, before)
                # The state the events left it in (claims leave no event).
                if row.state == StageState.IN_PROGRESS:
                    allowed = {StageState.PENDING, StageState.TERMINATED}
                    if running:
                        allowed.add(StageState.CANCELLED)  # cancelled while its call ran
                    assert implied[row.seq] in allowed, (label, implied[row.seq])
                else:
                    assert row.state == implied[row.seq], (label, row.state, implied[row.seq])
            assert len(active) <= 1, f"{uuid}: more than one stage active: {active}"
            if active:
                assert all(r.state == StageState.COMPLETED for r in rows
                           if r.seq < active[0].seq), f"{uuid}: active before its turn"
            operator = [e.kind for e in tx_events
                        if e.kind in (EventKind.CANCELLED, EventKind.REQUEUED)]
            cancelled = bool(operator) and operator[-1] == EventKind.CANCELLED
            assert txs[uuid].state == self._tx_state_from(rows, cancelled), (
                f"transaction {uuid} is {txs[uuid].state.value} but its stages are "
                f"{[(r.platform, r.stage, r.state.value) for r in rows]}"
                f"{' (cancelled)' if cancelled else ''}"
            )

    @staticmethod
    def _states_implied_by(rows, tx_events) -> dict[int, StageState]:
        """Replay the events: the state each stage was left in by its last event."""
        seq = {(r.platform, r.stage): r.seq for r in rows}
        state = {r.seq: StageState.PENDING for r in rows}
        for e in tx_events:
            if e.kind in (*ATTEMPT_KINDS, EventKind.RELEASED):
                state[seq[e.platform, e.stage]] = StageState(e.to_state)
                if e.outcome == Outcome.BUSINESS_ERROR:
                    for k, v in state.items():
                        if v in OPEN_STAGE_STATES:
                            state[k] = StageState.CANCELLED
            elif e.kind == EventKind.CANCELLED:
                for k, v in state.items():
                    if v in OPEN_STAGE_STATES:
                        state[k] = StageState.CANCELLED
            elif e.kind == EventKind.REQUEUED:
                for k, v in state.items():
                    if v != StageState.COMPLETED:
                        state[k] = StageState.PENDING
        return state

    @staticmethod
    def _tx_state_from(rows, cancelled: bool) -> TxState | str:
        if cancelled:
            return TxState.CANCELLED
        states = [r.state for r in rows]
        if StageState.REJECTED in states:
            return TxState.REJECTED
        if StageState.EXHAUSTED in states:
            return TxState.EXHAUSTED
        if StageState.CANCELLED in states:
            return "a CANCELLED stage without a rejection or a cancel"
        current = next((r for r in rows if r.state != StageState.COMPLETED), None)
        if current is None:
            return TxState.COMPLETED
        if current.state == StageState.IN_PROGRESS and current.started_at is not None:
            return TxState.IN_PROGRESS
        if current.state == StageState.TERMINATED or current.error_code is not None:
            return TxState.TERMINATED  # failed, possibly reserved again since
        return TxState.IN_PROGRESS if current.seq > 1 else TxState.PENDING

    def _check_owner_fencing(self, stages, events) -> None:
        """A stage reserved by X is started by X, and its attempt is recorded as X's."""
        for sid, prev in self.prev_stages.items():
            if prev.state != StageState.IN_PROGRESS:
                continue
            row = stages[sid]
            if row.state == StageState.IN_PROGRESS and row.started_at is not None:
                assert row.lease_owner == prev.lease_owner, (prev, row)
            recorded = [e for i, e in events.items()
                        if i not in self.seen_events and e.kind in ATTEMPT_KINDS
                        and (e.uuid, e.platform, e.stage) == (row.uuid, row.platform, row.stage)]
            for e in recorded:
                assert e.actor == prev.lease_owner, (prev, e)


MACHINE_SETTINGS = settings(
    max_examples=int(os.environ.get("TRACKING_PROPERTY_EXAMPLES", "200")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
)


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_store_state_machine(backend, request):
    if backend == "postgres":
        url = request.getfixturevalue("postgres_url")  # a database of this session's own
        machine = type("PostgresTrackerMachine", (TrackerMachine,),
                       {"fresh_database": staticmethod(lambda: _fresh_postgres(url))})
        # A PostgreSQL example costs about twice a SQLite one.
        chosen = settings(MACHINE_SETTINGS, max_examples=MACHINE_SETTINGS.max_examples * 3 // 4)
    else:
        machine, chosen = TrackerMachine, MACHINE_SETTINGS
    STATS.clear()
    run_state_machine_as_test(machine, settings=chosen)
    print("\n".join(f"{n:6} {text}" for text, n in sorted(STATS.items())))


# -- what the machine found, as plain examples -------------------------------------------------


def _to_last_stage(tracker: Tracker, request_id: str) -> str:
    uuid, _ = tracker.start_or_resume(P, {"request_id": request_id})
    tracker.complete_stage(uuid, "A", 0)
    tracker.complete_stage(uuid, "B", 0, stage="process")
    tracker.complete_stage(uuid, "B", 0, stage="confirm")
    return uuid


def test_requeue_after_a_cancel_that_raced_the_last_stage_leaves_nothing_stuck(tracker):
    uuid = _to_last_stage(tracker, "FE-1")
    tracker.claim(P, "C", owner="w1")
    tracker.start_attempt(uuid, "C", "main", owner="w1")
    tracker.cancel(uuid, reason="operator")  # C's call is running: it finishes
    tracker.complete_stage(uuid, "C", 0, owner="w1")  # ... and succeeds; the cancel stands
    try:
        tx = tracker.requeue(uuid, actor="ops")
    except InvalidTransition:  # refusing (nothing left to run) would be fine too
        tx = tracker.get_transaction(uuid)
    assert [s.state for s in tx.stages] == [StageState.COMPLETED] * 4
    # Requeue used to make it IN_PROGRESS with every stage COMPLETED and none runnable: no run
    # would ever finish it, and it could not be requeued again (IN_PROGRESS is not "stopped").
    assert tx.state in (TxState.COMPLETED, TxState.CANCELLED), tx.state


def test_a_cancelled_reservation_does_not_keep_its_lease(tracker, clock):
    cancelled, _ = tracker.start_or_resume(P, {"request_id": "FE-1"})
    tracker.claim(P, "A", owner="w1", lease_seconds=10)  # reserved, not started
    tracker.cancel(cancelled, reason="operator")
    lost, _ = tracker.start_or_resume(P, {"request_id": "FE-2"})
    tracker.claim(P, "A", owner="w2", lease_seconds=20)
    tracker.start_attempt(lost, "A", "validate", owner="w2", lease_seconds=20)
    clock.advance(30)  # w2 died in its call: its attempt is lost and must be recorded
    # Cancel used to leave the reservation's lease on the CANCELLED stage, and
    # recover_expired_leases picked "expired" stages by lease_expires_at alone: the cancelled
    # stage filled the limit on every call, for ever, and the lost attempt was never recorded.
    recovered = [tracker.recover_expired_leases(P, limit=1) for _ in range(3)]
    assert sum(recovered) == 1, recovered
    stage = tracker.get_transaction(cancelled).stages[0]
    assert (stage.state, stage.lease_expires_at) == (StageState.CANCELLED, None)
