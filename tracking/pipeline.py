"""How a resume run works through its stages: claim only what can start soon, run it as
Prefect task runs, keep the reservations alive, settle what each task run recorded.

A run goes platform stage by platform stage (``Pipeline.run``), in order, so one run can take
a transaction from A to B to C. It claims only free task run slots (plus, in stage
granularity, what its task runs will start within about a second, so a claim serves several
task runs of a fast platform and one round of a slow one), so every reserved stage starts
soon; a heartbeat renews what is reserved
but not started; a stage a task run left unrecorded is recorded as a system error if its
attempt started, else released with its attempts intact.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from tracking.artifacts import Tally
from tracking.catalog import Platform
from tracking.decorator import (
    Claim,
    TxContext,
    concurrency_limit_name,
    execute_batch,
    record_unfinished,
    take_back,
)
from tracking.models import StageState, TxStage
from tracking.store import MAX_CLAIM, Tracker

# A stage reserved but not started outlives a dead run this long at most (the live run's
# heartbeat renews it every third of that).
RESERVATION_SECONDS = 60.0
# Stage granularity reserves ahead what its task runs are expected to start within this long
# (from the task runs of the step so far), between one round and MAX_ROUNDS_AHEAD rounds.
RESERVE_AHEAD_SECONDS = 1.0
MAX_ROUNDS_AHEAD = 32
Granularity = Literal["stage", "batch"]


@task(name="platform-batch", cache_policy=NO_CACHE, persist_result=False,
      task_run_name="{label}")
def run_batch(
    label: str, platform_task: Task[..., Any], platform: Platform, contexts: list[TxContext]
) -> int:
    """Run a batch of claimed stages of one platform stage in one task run (each still
    tracked in SQL): each result recorded as its call returns, or, for an ``idempotent``
    platform, the batch's results recorded together."""
    if not platform.idempotent or platform.fn is None:
        for tx in contexts:
            platform_task.fn(tx)
        return len(contexts)
    process = contexts[0].process
    limit = concurrency_limit_name(process, platform.code) if platform.concurrency else None
    return execute_batch(platform.fn, contexts, limit)


@dataclass(frozen=True)
class Options:
    """What a resume run was asked to do (its flow parameters, checked)."""

    process: str
    uuid: str | None
    granularity: Granularity
    batch_size: int
    concurrency: int


class Budget:
    """The run's limits: ``max_stages`` claimed, ``max_seconds`` of claiming."""

    def __init__(self, max_stages: int | None, max_seconds: float | None) -> None:
        self.max_stages, self.max_seconds = max_stages, max_seconds
        self.deadline = time.monotonic() + max_seconds if max_seconds else None

    def room(self, claimed: int) -> int:
        """How many stages the run may still claim (at most one claim's worth)."""
        left = MAX_CLAIM if self.max_stages is None else self.max_stages - claimed
        return min(left, MAX_CLAIM)

    def exceeded(self, claimed: int) -> str | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return f"time limit of {self.max_seconds}s reached"
        if self.max_stages is not None and claimed >= self.max_stages:
            return f"limit of {self.max_stages} stages reached"
        return None


class Heartbeat:
    """Keeps a live run's leases from expiring: renews them every third of their length, in
    a background thread, so a slow batch never lets another run take over stages this run
    still holds (a dead run stops renewing, and its stages come back). Renewed: what is
    reserved but not started, and attempts whose call returned and whose batch is not
    recorded yet (``Claim.awaiting``) — never a call in progress, which keeps its own lease
    (a stuck call loses it)."""

    def __init__(self, tracker: Tracker, process: str, claim: Claim, seconds: float) -> None:
        owner = claim.owner

        def renew() -> None:
            tracker.renew_reservations(process, owner=owner, seconds=seconds)
            with claim.lock:
                awaiting = list(claim.awaiting)
            if awaiting:
                tracker.renew_attempts(awaiting, owner=owner, seconds=seconds)

        self._renew = renew
        self._every = seconds / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat-{owner}",
                                        daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._renew()
            except Exception as exc:  # the database may be back at the next beat
                logging.getLogger("tracking.pipeline").warning(
                    "could not renew reservations: %s: %s", type(exc).__name__, exc
                )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Ended:
    """The jobs whose task runs ended, as their futures report them; the run waits until
    enough have ended (``take``), so it is woken once per round rather than per task run."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ended: list[_Job] = []
        self._need = 1

    def watch(self, job: _Job) -> None:
        job.future.wrapped_future.add_done_callback(  # type: ignore[attr-defined]
            lambda _: self._add(job))

    def _add(self, job: _Job) -> None:
        with self._cond:
            self._ended.append(job)
            if len(self._ended) >= self._need:
                self._cond.notify()

    def take(self, at_least: int) -> list[_Job]:
        """The jobs that ended since the last call, once at least ``at_least`` have (no
        more than are in flight)."""
        with self._cond:
            self._need = at_least
            while len(self._ended) < at_least:
                self._cond.wait()
            ended, self._ended = self._ended, []
            self._need = 1
        return ended


class _Job:
    """One task run in flight: the claimed stages it runs and its future."""

    def __init__(self, contexts: list[TxContext], future: PrefectFuture[Any]) -> None:
        self.contexts = contexts
        self.future = future
        self.step = 0  # the index of its platform stage in the run
        self.submitted = time.monotonic()

    def ending(self) -> str:
        """How the task run ended, for a stage it left unrecorded."""
        try:
            state = self.future.wrapped_future.result()  # type: ignore[attr-defined]
        except BaseException as exc:  # a Prefect failure around the task run
            return f"{type(exc).__name__}: {exc}"[:500]
        return f"{getattr(state, 'name', state)}: {getattr(state, 'message', '')}"[:500]


def _submit(
    runner: ThreadPoolTaskRunner, platform_task: Task[..., Any], platform: Platform, stage: str,
    contexts: list[TxContext], granularity: Granularity,
) -> _Job:
    if granularity == "stage":
        (tx,) = contexts
        return _Job(contexts, runner.submit(platform_task, parameters={"tx": tx}))
    label = f"{platform.code}.{stage} x{len(contexts)}"
    # quote: Prefect passes them as they are, without walking every context (and the
    # platform's fields) to look for upstream futures: there are none.
    params = {"label": label, "platform_task": quote(platform_task),
              "platform": quote(platform), "contexts": quote(contexts)}
    return _Job(contexts, runner.submit(run_batch, parameters=params))


@dataclass
class _Step:
    """One platform stage of the run: what it has claimed and not yet submitted, and whether
    its last claim found nothing (it may find more when the step before it records some)."""

    index: int
    platform: Platform
    stage: str
    waiting: list[TxContext] = field(default_factory=list)
    drained: bool = False
    seconds_per_job: float | None = None  # a moving average of its task runs' durations

    def rounds_ahead(self) -> int:
        """How many rounds of task runs to reserve ahead: those due within about a second."""
        if not self.seconds_per_job:
            return 1
        return max(1, min(MAX_ROUNDS_AHEAD, int(RESERVE_AHEAD_SECONDS / self.seconds_per_job)))

    def finished(self, seconds: float) -> None:
        last = self.seconds_per_job
        self.seconds_per_job = seconds if last is None else 0.8 * last + 0.2 * seconds


class Pipeline:
    """Runs the runnable stages of a run. It claims only what it can start now (a free task
    run slot, plus one round ahead in stage granularity), so every reserved stage starts
    soon, and fills free slots from the earliest platform stage that has work: the next
    platform's stages start while the previous one is still finishing, so the run keeps its
    workers busy from A to B to C."""

    def __init__(
        self, tracker: Tracker, claim: Claim, runner: ThreadPoolTaskRunner, options: Options,
        tally: Tally, reserve_seconds: float, tasks: dict[str, Task[..., Any]],
    ) -> None:
        self.tracker, self.claim, self.runner, self.tasks = tracker, claim, runner, tasks
        self.options, self.tally, self.reserve_seconds = options, tally, reserve_seconds
        self.claimed = 0
        # The attempt count of each claimed stage when claimed: a transaction may have one
        # stage settling while its next one is already claimed.
        self._attempts_before: dict[tuple[str, str, str], int] = {}

    def run(
        self, steps: list[tuple[Platform, str]], budget: Budget,
        on_settled: Callable[[float], None] | None = None,
    ) -> str | None:
        """Work until nothing of any step is runnable; returns why it stopped early (a
        limit), if it did. ``on_settled(fraction)`` is called after each round of finished
        task runs, with the fraction of steps that found nothing more to run."""
        state = [_Step(i, platform, stage) for i, (platform, stage) in enumerate(steps)]
        jobs: list[_Job] = []
        stopped: str | None = None
        try:
            ended = _Ended()
            while True:
                stopped = stopped or self._claim_free_slots(state, jobs, budget)
                for job in self._submit_waiting(state, jobs):
                    ended.watch(job)
                if not jobs:
                    return stopped
                finished = ended.take(self._wake_after(len(jobs)))
                gone = set(finished)
                jobs = [j for j in jobs if j not in gone]
                self._settle(finished)
                now = time.monotonic()
                for job in finished:
                    state[job.step].finished(now - (job.contexts[0].began or job.submitted))
                for job in finished:  # what they recorded may have made the next step due
                    if job.step + 1 < len(state):
                        state[job.step + 1].drained = False
                if on_settled is not None:
                    on_settled(sum(s.drained and not s.waiting for s in state) / len(state))
        except BaseException:
            self.claim.stopping.set()  # what has not started must not start now
            for job in jobs:  # queued task runs never begin (their stages are released)
                job.future.wrapped_future.cancel()  # type: ignore[attr-defined]
            raise

    def _claim_free_slots(self, state: list[_Step], jobs: list[_Job], budget: Budget
                          ) -> str | None:
        """Claim for the free slots, earliest step first; why the run must stop, if so."""
        o = self.options
        unit = 1 if o.granularity == "stage" else o.batch_size
        for step in state:
            waiting = sum(len(s.waiting) for s in state)
            if unit == 1:
                # Stage granularity keeps what will start within about a second reserved
                # and submitted (the task runner queues it), so a claim serves several
                # task runs and a wake-up of the run several finished ones.
                room = o.concurrency * (1 + step.rounds_ahead()) - len(jobs) - waiting
            else:  # batches start as they are claimed: only for a free slot
                room = (o.concurrency - len(jobs) - -(-waiting // unit)) * unit
            if room <= 0:
                return None
            if step.drained or step.waiting:
                continue
            stopped = budget.exceeded(self.claimed)
            if stopped is not None:
                return stopped
            want = min(room, budget.room(self.claimed), o.batch_size if unit == 1 else room)
            # A batch of an idempotent platform is submitted now and called at once: its
            # attempts start with the claim (one database transaction less per batch).
            start = unit > 1 and step.platform.idempotent and step.platform.fn is not None
            claimed = self.tracker.reserve(
                o.process, step.platform.code, step.stage, owner=self.claim.owner,
                uuid=o.uuid, limit=want, start=start,
                lease_seconds=self.claim.lease_seconds if start else self.reserve_seconds,
            )
            step.drained = not claimed
            self.claimed += len(claimed)
            self._attempts_before.update(
                ((c.uuid, c.platform, c.stage), c.attempt - (c.started_at is not None))
                for c in claimed)
            step.waiting.extend(TxContext.of_reservation(c, self.claim) for c in claimed)
        return None

    def _submit_waiting(self, state: list[_Step], jobs: list[_Job]) -> list[_Job]:
        """Submit what is claimed: every stage (stage granularity: the task runner runs
        ``concurrency`` at once and queues the rest), or a batch per free slot. Returns the
        jobs submitted."""
        o = self.options
        unit = 1 if o.granularity == "stage" else o.batch_size
        slots = len(jobs) + sum(len(s.waiting) for s in state) if unit == 1 else o.concurrency
        submitted = []
        for step in state:
            while step.waiting and len(jobs) < slots:
                task = self.tasks[step.platform.code]
                job = _submit(self.runner, task, step.platform, step.stage,
                              step.waiting[:unit], o.granularity)
                job.step = step.index
                jobs.append(job)
                submitted.append(job)
                del step.waiting[:unit]
        return submitted

    def _wake_after(self, in_flight: int) -> int:
        """How many task runs to wait for before the next round of claims: half of what is
        queued beyond the running ones (stage granularity keeps its queue full and wakes
        once per round, not once per task run), else one."""
        if self.options.granularity != "stage":
            return 1
        return max(1, (in_flight - self.options.concurrency) // 2)

    def _settle(self, jobs: list[_Job]) -> None:
        """Tally what the finished task runs recorded. A stage they left unrecorded is a
        system error when its attempt had started (the task run's ending as description),
        or released, attempts intact, when it never started (Prefect failed before the
        call, or the run is stopping)."""
        contexts = []
        for job in jobs:
            for tx in job.contexts:
                if tx.recorded is not None:  # the common case: recorded by this run's call
                    self._attempts_before.pop((tx.uuid, tx.platform, tx.stage), None)
                    self.tally.add(tx.recorded)
                else:
                    contexts.append((tx, job))
        if not contexts:
            return
        by_step: dict[tuple[str, str], list[tuple[TxContext, _Job]]] = {}
        for tx, job in contexts:
            by_step.setdefault((tx.platform, tx.stage), []).append((tx, job))
        unstarted = []
        for (platform, stage_name), group in by_step.items():
            stages = self.tracker.get_stages([tx.uuid for tx, _ in group], platform, stage_name)
            unstarted += self._settle_unrecorded(group, stages)
        self._release(unstarted)

    def _settle_unrecorded(
        self, contexts: list[tuple[TxContext, _Job]], stages: list[TxStage]
    ) -> list[str]:
        """Record or tally the stages a task run left unrecorded; the uuids to release."""
        unstarted, uncalled = [], []
        for (tx, job), stage in zip(contexts, stages, strict=True):
            mine = stage.lease_owner == self.claim.owner
            if stage.state == StageState.IN_PROGRESS and mine:
                if stage.started_at is None:
                    unstarted.append(tx.uuid)
                    continue
                if not tx.called:  # started with its claim, never called: take it back
                    tx.started_at = stage.started_at
                    uncalled.append(tx)
                    continue
                why = f"the task run ended without recording its attempt ({job.ending()})"
                stage = record_unfinished(self.tracker, tx, why) or stage
            if mine:
                self._tally(tx, stage)
        take_back(self.tracker, uncalled, logging.getLogger("tracking.pipeline"))
        return unstarted + [tx.uuid for tx in uncalled]  # released if taken back

    def _tally(self, tx: TxContext, stage: TxStage) -> None:
        """Count what this run attempted (not a stage it skipped or another run took)."""
        before = self._attempts_before.pop((tx.uuid, tx.platform, tx.stage), stage.attempt)
        if stage.attempt > before:
            self.tally.add(stage)

    def _release(self, unstarted: list[str]) -> None:
        if unstarted:
            self.claimed -= self.tracker.release(
                self.options.process, owner=self.claim.owner, uuids=unstarted,
                reason="its task run ended before starting it",
            )


