"""The Prefect edge of a platform: its function run as a tracked Prefect task.

Define platforms with ``Process.platform`` (the function stays a plain function); the
resume flow runs each through ``tracked_task(process, platform)``, a real Prefect ``Task``::

    cancellation = Process("CANCELLATION", dedup=KeyFields("request_id"))

    @cancellation.platform("SAP", order=1, retry=RetryPolicy(max_attempts=3, delay=300),
                           retries=1, retry_delay_seconds=10)
    def cancel_in_sap(tx: TxContext) -> int:
        tx.logger.info("cancelling order %s", tx.payload["order_id"])
        return 0                      # or ExecutionResult(...), or raise BusinessError(...)

Inside a resume run each call starts the attempt (it counts from then; a stage whose claim
was lost is skipped, the platform not called), records it (an event and the stage
transition, fenced by the run's claim) and ends the task run in a state that says what
happened:

==============  ===============  =====================================================
outcome         task run state   what follows
==============  ===============  =====================================================
success         ``Completed``    the next stage becomes runnable
business error  ``Rejected``     (Completed-type) the transaction is rejected
system error    ``SystemError``  (Failed-type) Prefect's in-run retries (``retries=``),
                                 then later runs per the RetryPolicy
attempts used   ``Exhausted``    (Failed-type) no more retries
==============  ===============  =====================================================

Every in-run retry is an attempt and counts against the policy's ``max_attempts``; business
errors are never retried. Outside a run, ``cancel_in_sap(TxContext(...))`` calls the plain
function, for unit tests.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.states import Completed, Failed, State

from tracking.catalog import Platform, Process
from tracking.errors import InvalidTransition, LeaseLost
from tracking.models import StageState, TxStage, TxState
from tracking.outcomes import ExecutionResult, Outcome, result_from_exception, to_result
from tracking.recorder import Recorder
from tracking.store import Completion, RecordedAttempt, Reservation, Tracker

REJECTED = "Rejected"
SYSTEM_ERROR = "SystemError"
EXHAUSTED = "Exhausted"
SKIPPED = "Skipped"
LEASE_LOST = "LeaseLost"


@dataclass(frozen=True)
class Claim:
    """Where an attempt is recorded: the tracker and the run that claimed the stage.

    ``lease_seconds`` is how long a started attempt may take before it counts as lost;
    ``stopping`` is set when the run stops: reserved stages are then not started. The run's
    task runs start and record their attempts through ``recorder`` (grouped into shared
    database transactions).
    """

    tracker: Tracker
    owner: str
    lease_seconds: float
    stopping: threading.Event = field(default_factory=threading.Event, compare=False)
    # Transactions whose attempt returned and waits to be recorded with its batch: the
    # run's heartbeat keeps their leases alive meanwhile.
    awaiting: set[str] = field(default_factory=set, compare=False)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)
    recorder: Recorder = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "recorder",
                           Recorder(self.tracker, self.owner, self.lease_seconds))


class TxContext:
    """What a platform function receives: the item and where it stands.

    Attributes:
        uuid: the transaction's id.
        process, platform, stage: where it is.
        attempt: this attempt's number (1 for the first).
        business_key: the item's key (from the dedup strategy), e.g. the request id.
        payload: the item's data (a dict).
        logger: the Prefect run logger inside a run, a standard logger otherwise.

    For a unit test of a platform function: ``TxContext(payload={...})``.
    """

    def __init__(
        self,
        payload: dict[str, Any] | None = None,
        *,
        uuid: str = "",
        process: str = "",
        platform: str = "",
        stage: str = "",
        attempt: int = 1,
        business_key: str = "",
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        claim: Claim | None = None,
    ) -> None:
        self.payload = payload or {}
        self.uuid = uuid
        self.process = process
        self.platform = platform
        self.stage = stage
        self.attempt = attempt
        self.business_key = business_key
        self.logger = logger or _platform_logger(platform)
        self.claim = claim
        # Set by the tracked task for its run's bookkeeping: the stage as this attempt
        # recorded it (None when it recorded nothing: skipped, or ended before recording).
        self.recorded: TxStage | RecordedAttempt | None = None
        # The transaction's state when its stage was claimed (to take back an attempt).
        self.claimed_state = TxState.PENDING
        # When this attempt started (None while only reserved), and whether the platform
        # function was called: an attempt started but never called is taken back.
        self.started_at: datetime | None = None
        self.called = False
        # When its task run began (time.monotonic()): how a run paces its claims.
        self.began: float | None = None

    @classmethod
    def of(cls, stage: TxStage, claim: Claim) -> TxContext:
        """The context of a stage claimed by ``claim.owner``."""
        tx = stage.transaction
        context = cls(
            dict(tx.payload) if tx else {},
            uuid=stage.uuid,
            process=stage.process_code,
            platform=stage.platform,
            stage=stage.stage,
            attempt=stage.attempt,
            business_key=tx.business_key if tx else "",
            claim=claim,
        )
        if tx is not None:
            context.claimed_state = TxState(tx.state)
        return context

    @classmethod
    def of_reservation(cls, r: Reservation, claim: Claim) -> TxContext:
        """The context of a stage reserved by ``claim.owner`` (``Tracker.reserve``)."""
        context = cls(r.payload, uuid=r.uuid, process=r.process_code, platform=r.platform,
                      stage=r.stage, attempt=r.attempt, business_key=r.business_key,
                      claim=claim)
        context.claimed_state = r.tx_state
        context.started_at = r.started_at
        return context

    def __repr__(self) -> str:
        return (
            f"TxContext({self.platform}.{self.stage} {self.business_key or self.uuid}, "
            f"attempt={self.attempt})"
        )


@functools.lru_cache(maxsize=256)
def _platform_logger(platform: str) -> logging.Logger:
    # A batch makes hundreds of contexts: the logger is looked up once per platform.
    return logging.getLogger(f"tracking.platform.{platform or 'test'}")


def retry_system_errors(task: Task[..., Any], task_run: Any, state: State[Any]) -> bool:
    """Prefect ``retry_condition_fn``: retry system errors only (a plain function on purpose:
    Prefect 3.8.8 silently ignores callable objects here)."""
    return state.name == SYSTEM_ERROR


def _run_ids() -> tuple[str | None, str | None, int]:
    ctx = TaskRunContext.get()
    if ctx is None:
        return None, None, 1
    run = ctx.task_run
    return (str(run.flow_run_id) if run.flow_run_id else None, str(run.id), run.run_count)


def _call(fn: Callable[[TxContext], Any], tx: TxContext) -> ExecutionResult:
    """Run the platform function and turn whatever happens into a result."""
    tx.called = True
    try:
        value = fn(tx)
    except Exception as exc:  # any failure of the platform is an outcome, not a crash
        return result_from_exception(exc)
    try:
        return to_result(value)
    except TypeError as exc:
        return ExecutionResult(-1, f"platform {tx.platform!r} returned an invalid result: {exc}")


def concurrency_limit_name(process: str, platform: str) -> str:
    """The Prefect global concurrency limit of a platform with ``concurrency=N``."""
    return f"tracking:{process}:{platform}"


_NO_SESSION = nullcontext()


def session(limit: str | None) -> AbstractContextManager[Any]:
    """One of the platform's sessions for the duration of a call (a slot of its Prefect
    global concurrency limit, waited for), or nothing for a platform without a limit. Only
    those task runs pay the slot API calls."""
    if limit is None:
        return _NO_SESSION  # a batch enters it for each call
    from prefect.concurrency.sync import concurrency

    return concurrency(limit, occupy=1, strict=True)


def execute(
    fn: Callable[[TxContext], Any], tx: TxContext, limit: str | None = None
) -> State[Any]:
    """Run one attempt of a claimed stage, record it, and say how it ended as a State.
    ``limit`` names the platform's concurrency limit, if it has one."""
    claim = tx.claim
    assert claim is not None, "execute() needs a claimed stage"
    tx.began = time.monotonic()
    flow_run_id, task_run_id, run_count = _run_ids()
    tracker = claim.tracker
    try:
        tx.logger = get_run_logger()
    except Exception:  # outside a run context (batch helpers in tests)
        pass
    if claim.stopping.is_set():
        return Completed(name=SKIPPED, message="the run is stopping: not started")
    if run_count > 1:
        # An in-run retry: claim the stage again (it went TERMINATED after the last attempt).
        stage = tracker.claim_stage(
            tx.uuid, tx.platform, tx.stage, owner=claim.owner, lease_seconds=claim.lease_seconds
        )
        if stage is None:
            return Completed(name=SKIPPED, message="the stage can no longer run (it changed)")
    with session(limit):  # waiting for a session is not part of the attempt
        try:
            # The attempt counts from here; a lost reservation means another run may have it.
            tx.attempt = claim.recorder.start(tx.uuid, tx.platform, tx.stage)
        except LeaseLost as exc:
            tx.logger.warning("not started: %s", exc)
            return Completed(name=SKIPPED, message=f"not started: {exc}")
        result = _call(fn, tx)
    try:
        stage = claim.recorder.complete(
            tx.uuid, tx.platform, tx.stage, result, task_run_id=task_run_id, flow_run_id=flow_run_id
        )
    except LeaseLost as exc:
        tx.logger.warning("attempt not recorded: %s", exc)
        return Failed(name=LEASE_LOST, message=str(exc))
    tx.recorded = stage
    return state_for(result, stage)


def execute_batch(
    fn: Callable[[TxContext], Any], contexts: list[TxContext], limit: str | None = None
) -> int:
    """Run the attempts of a batch of claimed stages of one platform stage and record them
    together: the attempts start together (already with their reservation,
    ``Tracker.reserve(start=True)``, or here with ``Tracker.start_attempts``), the calls run
    one after the other, and the results are written at the end in one database transaction
    (``Tracker.complete_batch``); until then the run's heartbeat keeps the leases alive.
    Returns how many were recorded.

    Used for ``Platform(idempotent=True)`` only: if the process dies before the batch is
    recorded, each attempt of the batch is recorded as lost (once) and retried, so its
    finished calls are called again. Other platforms run through ``execute``, recorded call
    by call, so a crash repeats at most the call in flight. A run that is stopping calls
    nothing more: the attempts not called are taken back (``Tracker.unstart``) and the
    stages released with their attempts intact.
    """
    claim = contexts[0].claim
    assert claim is not None, "execute_batch() needs claimed stages"
    flow_run_id, task_run_id, _ = _run_ids()
    tracker = claim.tracker
    try:
        logger: Any = get_run_logger()
    except Exception:  # outside a run context (batch helpers in tests)
        logger = contexts[0].logger
    reserved = [tx for tx in contexts if tx.started_at is None]
    if reserved and not claim.stopping.is_set():
        _start(tracker, claim, reserved, logger)
    started = [tx for tx in contexts if tx.started_at is not None]
    with claim.lock:
        claim.awaiting.update(tx.uuid for tx in started)
    completions: list[Completion] = []
    try:
        for tx in started:
            if claim.stopping.is_set():
                break
            tx.logger = logger
            with session(limit):
                result = _call(fn, tx)
            completions.append(Completion(tx.uuid, tx.platform, tx.stage, result, task_run_id))
        recorded = tracker.complete_batch(completions, owner=claim.owner,
                                          flow_run_id=flow_run_id) if completions else []
    finally:
        with claim.lock:
            claim.awaiting.difference_update(tx.uuid for tx in started)
        take_back(tracker, started[len(completions):], logger)
    for tx, stage in zip(started, recorded, strict=False):
        if isinstance(stage, LeaseLost):
            logger.warning("attempt not recorded: %s", stage)
        else:
            tx.recorded = stage
    return sum(tx.recorded is not None for tx in started)


def _start(tracker: Tracker, claim: Claim, reserved: list[TxContext], logger: Any) -> None:
    """Start the attempts of reserved stages of a batch (``started_at`` set on each one
    started; a stage no longer reserved by the run is not)."""
    first, since = reserved[0], tracker.clock()
    attempts = tracker.start_attempts(first.platform, first.stage, [tx.uuid for tx in reserved],
                                      owner=claim.owner, lease_seconds=claim.lease_seconds)
    for tx in reserved:
        if tx.uuid in attempts:
            tx.attempt, tx.started_at = attempts[tx.uuid], since
        else:
            logger.warning("not started: stage %s.%s of transaction %s is no longer reserved "
                           "by %r", tx.platform, tx.stage, tx.uuid, claim.owner)


def take_back(tracker: Tracker, uncalled: list[TxContext], logger: Any) -> int:
    """Uncount the started attempts of a batch whose platform was not called (each stage
    reserved by the run again, attempt and transaction state as claimed: the run then
    releases them). Returns how many were taken back."""
    if not uncalled:
        return 0
    first, claim = uncalled[0], uncalled[0].claim
    assert claim is not None
    before = {tx.uuid: tx.claimed_state for tx in uncalled}
    since = min(tx.started_at for tx in uncalled if tx.started_at is not None)
    try:
        return tracker.unstart(first.platform, first.stage, before, owner=claim.owner,
                               since=since)
    except Exception as exc:  # their leases expire; each is then recorded as lost, once
        logger.warning("could not take back %d attempts not called: %s: %s", len(uncalled),
                       type(exc).__name__, exc)
        return 0


def state_for(result: ExecutionResult, stage: TxStage) -> State[Any]:
    """The Prefect state that tells what an attempt amounted to."""
    text = f"error {result.error_code}: {result.description or 'no description'}"
    if result.outcome == Outcome.SUCCESS:
        return Completed(message=result.description, data=result)
    if result.outcome == Outcome.BUSINESS_ERROR:
        return Completed(name=REJECTED, message=f"business {text}", data=result)
    if stage.state == StageState.EXHAUSTED:
        return Failed(name=EXHAUSTED, message=f"system {text}; attempts exhausted")
    return Failed(name=SYSTEM_ERROR, message=f"system {text}; retry at {stage.next_attempt_at}")


def tracked_task(process: Process, platform: Platform) -> Task[[TxContext], Any]:
    """The Prefect task that runs ``platform``'s function and records every attempt.

    It wraps the function (``functools.update_wrapper``: its name, docstring and signature
    show in Prefect and in editors). ``platform.task_options`` are Prefect task options;
    ``retries`` and ``retry_delay_seconds`` give in-run retries of system errors (default
    none: later runs retry per the RetryPolicy).
    """
    fn = platform.fn
    if fn is None:
        raise ValueError(
            f"platform {platform.code!r} of {process.code!r} has no function: define it "
            "with @process.platform(...)"
        )

    limit = concurrency_limit_name(process.code, platform.code) if platform.concurrency else None

    def run(tx: TxContext) -> Any:
        if tx.claim is None:
            return fn(tx)  # a plain call, e.g. a unit test of the platform function
        return execute(fn, tx, limit)

    functools.update_wrapper(run, fn)
    options: dict[str, Any] = {
        "name": f"{process.code}.{platform.code}",
        "task_run_name": "{tx.platform}.{tx.stage} {tx.business_key}",
        # No tags: Prefect makes every tagged task run acquire and release `tag:` concurrency
        # slots through its API (calls per stage, and a failure point); the resume flow run
        # carries the process and platform tags instead.
        "cache_policy": NO_CACHE,
        "persist_result": False,
        **platform.task_options,
        "retry_condition_fn": retry_system_errors,
    }
    return Task(fn=run, **options)


def record_unfinished(tracker: Tracker, tx: TxContext, why: str) -> TxStage | None:
    """Record a system error for a claimed stage whose task run ended without recording one
    (timed out, crashed); a no-op if the attempt was recorded after all."""
    assert tx.claim is not None
    try:
        return tracker.complete_stage(
            tx.uuid, tx.platform, ExecutionResult(-1, why), stage=tx.stage, owner=tx.claim.owner
        )
    except InvalidTransition:
        return None
