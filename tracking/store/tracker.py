"""``Tracker``: the public face of the store. Every state change goes through it.

Example:
    engine = connect("sqlite:///tracking.db", migrate=True)
    tracker = Tracker(engine, processes=[process])
    uuid, is_new = tracker.start_or_resume("CANCELLATION", {"request_id": "FE-1"})
    for stage in tracker.claim("CANCELLATION", "A", owner="run-42"):
        tracker.start_attempt(stage.uuid, "A", stage.stage, owner="run-42")
        tracker.complete_stage(stage.uuid, "A", 0, owner="run-42")

Each public method is one database transaction (or a few, each complete): the audit event and
the transition it records commit together or not at all. Several workers may share a
database: ``claim`` reserves each runnable stage for one worker only, and starts and
completions are fenced by the claim's owner. The work is done by one module per concept:
``catalog``, ``intake``, ``claims``, ``leases``, ``transitions``, ``reads`` and
``retention``; the rules they follow are declared in ``tracking.states``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from tracking.catalog import Platform, Process
from tracking.connections import write_transaction
from tracking.errors import LeaseLost, UnknownProcessError
from tracking.memory import rarer_young_collections
from tracking.models import EventKind, TxProcess, TxStage, TxState, utcnow
from tracking.outcomes import ExecutionResult, to_result
from tracking.schedule import Item, Schedule, check_time
from tracking.store import (
    batches,
    catalog,
    claims,
    intake,
    leases,
    reads,
    retention,
    transitions,
)
from tracking.store.batches import Completion, RecordedAttempt
from tracking.store.claims import Start
from tracking.store.intake import Intake
from tracking.store.sql import check_limit, check_owner, check_seconds, lock


class Tracker:
    """Tracks transactions of registered processes in the database behind ``engine``.

    Args:
        engine: from ``tracking.connect()``.
        processes: processes to register right away.
        clock: returns the current UTC time (tests pass a fake clock).
        rng: random source for retry jitter.
    """

    def __init__(
        self,
        engine: Engine,
        processes: Iterable[Process] = (),
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.rng = rng or random.Random()
        self._processes: dict[str, Process] = {}
        for process in processes:
            self.register(process)

    # -- catalog ---------------------------------------------------------------------------

    def register(self, process: Process) -> Process:
        """Make ``process`` known to this tracker and store its catalog in the database."""
        if not isinstance(process, Process):
            raise TypeError(f"expected a Process, got {process!r}")
        if not process.platforms:
            raise ValueError(f"process {process.code!r} has no platforms")
        catalog.register(self.engine, process, self.clock())
        self._processes[process.code] = process
        return process

    @property
    def processes(self) -> list[Process]:
        return list(self._processes.values())

    def process(self, code: str) -> Process:
        """The registered process with this code (``UnknownProcessError`` otherwise)."""
        try:
            return self._processes[code]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._processes)) or "none"
            raise UnknownProcessError(f"unknown process {code!r} (registered: {known})") from None

    def _platform_stage(self, process_code: str, platform: str, stage: str | None
                        ) -> tuple[Process, Platform, str]:
        process = self.process(process_code)
        p = process.get_platform(platform)
        return process, p, p.resolve_stage(stage)

    # -- intake ----------------------------------------------------------------------------

    def start_or_resume(
        self, process_code: str, payload: Mapping[str, Any], *, source: str | None = None,
        priority: int = 0, not_before: datetime | None = None, deadline: datetime | None = None,
    ) -> tuple[str, bool]:
        """Create the transaction for ``payload`` with all its stages, unless it exists.

        Returns ``(uuid, is_new)``; a duplicate (same dedup fingerprint) returns the existing
        transaction's uuid with ``is_new=False`` and changes nothing (its schedule included).
        ``priority`` (higher is claimed first), ``not_before`` (its first stage is not due
        before) and ``deadline`` (with the process's SLA: when it is overdue) are its
        schedule, kept beside the payload (``tracking.schedule``; aware datetimes).
        """
        (result,) = self.start_many(process_code, [payload], source=source, priority=priority,
                                    not_before=not_before, deadline=deadline)
        return result.uuid, result.is_new

    @rarer_young_collections()  # a batch makes thousands of short-lived objects
    def start_many(
        self, process_code: str, payloads: Sequence[Mapping[str, Any] | Item], *,
        source: str | None = None, priority: int = 0, not_before: datetime | None = None,
        deadline: datetime | None = None,
    ) -> list[Intake]:
        """Bulk ``start_or_resume``: one database transaction for the whole batch.

        Every payload is validated (``tracking.payloads``) before anything is written; one
        bad payload rejects the batch with an error naming its index. An ``Item`` carries its
        own schedule; plain payloads get ``priority``, ``not_before`` and ``deadline``.
        """
        process = self.process(process_code)
        default = Schedule.of(priority, not_before, deadline)
        return intake.start_many(self.engine, process, payloads, source, self.clock(), default)

    # -- finding and claiming work ---------------------------------------------------------

    def get_pending_stages(
        self, process_code: str, platform: str, stage: str | None = None, *,
        limit: int | None = None,
    ) -> list[TxStage]:
        """Runnable stages of one platform stage, higher priority first, then oldest due
        (read-only, one query)."""
        _, p, stage = self._platform_stage(process_code, platform, stage)
        query = claims.runnable(process_code, p.code, stage, self.clock())
        if limit is not None:
            query = query.limit(check_limit(limit))
        return reads.get_pending_stages(self.engine, query)

    @rarer_young_collections()  # a batch makes thousands of short-lived objects
    def claim(
        self, process_code: str, platform: str, stage: str | None = None, *, owner: str,
        limit: int = 100, lease_seconds: float = 1800, uuid: str | None = None,
    ) -> list[TxStage]:
        """Reserve up to ``limit`` runnable stages for ``owner``: overdue ones first (their
        ``due_at`` passed, earliest first), then higher priority first, then oldest due.

        The claimed stages are IN_PROGRESS (reserved), their ``transaction`` (payload,
        business key) loaded; their attempt counter is unchanged until ``start_attempt``
        (or ``complete_stage``) says the attempt began. No other worker can claim them until
        ``lease_seconds`` pass; a run that holds them longer calls ``renew_reservations``.
        An expired reservation goes back to runnable with its attempts intact.

        An owner stands for one run: it is never handed a stage whose last attempt it made
        itself, so a failing stage is retried by a later run (or by an in-run retry through
        ``claim_stage``), never in a tight loop. ``uuid`` limits the claim to one transaction.
        """
        return claims.claim(self.engine, self._claim(process_code, platform, stage, owner,
                                                     limit, lease_seconds, uuid))

    @rarer_young_collections()  # a batch makes thousands of short-lived objects
    def reserve(
        self, process_code: str, platform: str, stage: str | None = None, *, owner: str,
        limit: int = 100, lease_seconds: float = 1800, uuid: str | None = None,
        start: bool = False,
    ) -> list[claims.Reservation]:
        """``claim``, returning only what a platform call needs (``Reservation``: the stage's
        place and attempt, the transaction's business key, state and payload) instead of the
        whole rows: what a resume run uses, a fraction of ``claim``'s cost per stage.

        ``start=True`` also starts the attempts, as ``start_attempts`` would right after, in
        the same database transaction: for a batch whose calls begin now (a resume run's
        batch of an idempotent platform). Each attempt is counted and leased for
        ``lease_seconds`` from now; one that is then not called goes back with ``unstart``.

        Example:
            batch = tracker.reserve("SAP", "A", owner="run-42", limit=500, start=True)
        """
        claim = self._claim(process_code, platform, stage, owner, limit, lease_seconds, uuid)
        return claims.reserve(self.engine, claim, start=start)

    def _claim(
        self, process_code: str, platform: str, stage: str | None, owner: str, limit: int,
        lease_seconds: float, uuid: str | None,
    ) -> claims.Claim:
        """What ``claim`` and ``reserve`` reserve (checked), once the lost attempts of dead
        workers are recorded (one indexed query when there are none), so that this claim
        can take their stages (it gives their expired reservations back itself)."""
        _, p, stage = self._platform_stage(process_code, platform, stage)
        limit, owner = check_limit(limit), check_owner(owner)
        lease_seconds = check_seconds(lease_seconds)
        if uuid is not None:
            _check_strings(uuid=uuid)
        leases.recover_lost_attempts(self.engine, process_code, p.code, 1000, self.clock,
                                     self.rng)
        return claims.Claim(process_code, p.code, stage, owner, lease_seconds, self.clock(),
                            limit, uuid)

    def claim_stage(
        self, uuid: str, platform: str, stage: str | None = None, *, owner: str,
        lease_seconds: float = 1800,
    ) -> TxStage | None:
        """Claim this one stage for an immediate retry, even if its next attempt is not due.

        Used for Prefect's in-run retries. Returns None when the stage cannot run now
        (finished, exhausted, cancelled, or claimed by another worker).
        """
        _, p, stage = self._platform_stage(reads.process_of(self.engine, uuid), platform, stage)
        owner, lease_seconds = check_owner(owner), check_seconds(lease_seconds)
        return claims.claim_one(self.engine, uuid, p.code, stage, owner, lease_seconds,
                                self.clock())

    def extend_lease(
        self, uuid: str, platform: str, stage: str | None = None, *, owner: str, seconds: float
    ) -> datetime:
        """Push back the lease of a long-running attempt (``LeaseLost`` if it was lost)."""
        _, p, stage = self._platform_stage(reads.process_of(self.engine, uuid), platform, stage)
        expires = self.clock() + timedelta(seconds=seconds)
        return claims.extend_lease(self.engine, uuid, p.code, stage, owner, expires)

    def start_attempt(
        self, uuid: str, platform: str, stage: str, *, owner: str, lease_seconds: float = 1800
    ) -> int:
        """Start the attempt of a stage ``owner`` has reserved; returns the attempt number.

        Call it right before the platform is called: the attempt counts from now, and the
        lease now runs ``lease_seconds`` from now and is not renewed (a call stuck past it
        loses the stage). Raises ``LeaseLost`` when the reservation is gone (it expired and was
        released or taken over, or an operator cancelled the transaction): then do not call
        the platform.
        """
        owner, lease_seconds = check_owner(owner), check_seconds(lease_seconds)
        _check_strings(uuid=uuid, platform=platform, stage=stage)
        return claims.start_attempt(self.engine, uuid, platform, stage, owner, self.clock(),
                                    lease_seconds)

    def start_attempts(
        self, platform: str, stage: str, uuids: Sequence[str], *, owner: str,
        lease_seconds: float = 1800,
    ) -> dict[str, int]:
        """Start the attempts of many stages of one platform stage that ``owner`` has
        reserved, together (a batch of an idempotent platform); the attempt number of each
        one started, by uuid. A uuid missing from the answer is no longer reserved by
        ``owner``: do not call the platform for it.

        Example:
            started = tracker.start_attempts("SAP", "main", [s.uuid for s in claimed],
                                             owner="run-42")
        """
        owner, lease_seconds = check_owner(owner), check_seconds(lease_seconds)
        uuids = _check_uuids(uuids)
        _check_strings(platform=platform, stage=stage)
        return claims.start_attempts(self.engine, platform, stage, uuids, owner, self.clock(),
                                     lease_seconds)

    def unstart(
        self, platform: str, stage: str, before: Mapping[str, TxState], *, owner: str,
        since: datetime,
    ) -> int:
        """Take back attempts that ``start_attempts`` started from ``since`` on and whose
        platform was never called (the run is stopping): each stage is reserved by
        ``owner`` again with its attempt uncounted, and its transaction back in the state
        it had before (``before``: uuid -> state, as claimed). Then ``release`` them."""
        owner = check_owner(owner)
        return claims.unstart(self.engine, platform, stage, dict(before), owner, since,
                              self.clock())

    def renew_attempts(self, uuids: Sequence[str], *, owner: str, seconds: float) -> int:
        """Keep the leases of started attempts of these transactions alive (``owner``'s):
        for attempts whose call returned and whose result waits to be recorded with its
        batch. Returns how many were renewed."""
        owner = check_owner(owner)
        expires = self.clock() + timedelta(seconds=check_seconds(seconds))
        return claims.renew_started(self.engine, list(uuids), owner, expires)

    def renew_reservations(self, process_code: str, *, owner: str, seconds: float) -> int:
        """Keep the reservations of a live run from expiring: each not-yet-started stage that
        ``owner`` holds is reserved for ``seconds`` from now (one statement). Started
        attempts keep their own lease. Returns how many were renewed."""
        owner = check_owner(owner)
        expires = self.clock() + timedelta(seconds=check_seconds(seconds))
        return claims.renew(self.engine, process_code, owner, expires)

    def release(
        self, process_code: str, *, owner: str, uuids: Sequence[str] | None = None,
        reason: str = "the run stopped before starting it",
    ) -> int:
        """Give back what ``owner`` reserved but has not started (all of it, or only the
        stages of these transactions): runnable again now, attempts intact, a RELEASED event
        each. Started attempts are left alone. Returns how many stages were released."""
        owner = check_owner(owner)
        if uuids is not None:
            uuids = _check_uuids(uuids)
        return leases.release_held(self.engine, process_code, owner,
                                   f"released by {owner}: {reason}", self.clock(), uuids)

    def recover_expired_leases(
        self, process_code: str, platform: str | None = None, *, limit: int = 1000
    ) -> int:
        """Make the stages of dead workers runnable again.

        An expired reservation (never started) is released with its attempts intact (a
        RELEASED event). An expired started attempt counts as lost: a LEASE_EXPIRED event (a
        system error, code -1), then TERMINATED (due per the retry policy) or EXHAUSTED.
        Returns how many stages were recovered.
        """
        process = self.process(process_code)
        code = process.get_platform(platform).code if platform else None
        released = leases.release_expired(self.engine, process_code, code, self.clock())
        return released + leases.recover_lost_attempts(self.engine, process_code, code, limit,
                                                       self.clock, self.rng)

    # -- recording attempts ----------------------------------------------------------------

    def complete_stage(
        self, uuid: str, platform: str, result: ExecutionResult | int, *,
        stage: str | None = None, owner: str | None = None, flow_run_id: str | None = None,
        task_run_id: str | None = None,
    ) -> TxStage:
        """Record an attempt's result and move the stage and transaction on.

        ``result`` is an ``ExecutionResult`` or a plain int error code. Without ``owner`` the
        stage must be runnable and unclaimed (an attempt is counted now); with ``owner`` it
        must be claimed by that owner (``LeaseLost`` otherwise: a stale worker never
        overwrites an attempt that was taken over). Works for any process in the database:
        the stage carries the retry policy it runs under.
        """
        result = to_result(result)
        now = self.clock()
        with write_transaction(self.engine) as conn:
            stages, tx = lock(conn, uuid)
            row = transitions.find_stage(stages, uuid, platform, stage)
            transitions.check_can_complete(row, owner, now)
            return transitions.apply(
                conn, tx, stages, row, result, now, self.rng, kind=EventKind.ATTEMPT,
                actor=owner, flow_run_id=flow_run_id, task_run_id=task_run_id,
            )

    @rarer_young_collections()  # a batch makes thousands of short-lived objects
    def complete_many(
        self, completions: Sequence[Completion], *, owner: str, flow_run_id: str | None = None,
    ) -> list[TxStage | LeaseLost]:
        """Record the results of many claimed stages (one per transaction) in one database
        transaction, with a handful of set-based statements whatever their number.

        Example:
            done = tracker.complete_many(
                [Completion(uuid, "SAP", "main", ExecutionResult(0)) for uuid in uuids],
                owner="run-42",
            )

        Each entry of the answer is the recorded stage, in order, or a ``LeaseLost`` for a
        stage no longer claimed by ``owner`` (nothing is written for it; the others are).
        """
        return self._complete_many(completions, owner, flow_run_id).stages()

    @rarer_young_collections()  # a batch makes thousands of short-lived objects
    def complete_batch(
        self, completions: Sequence[Completion], *, owner: str, flow_run_id: str | None = None,
    ) -> list[RecordedAttempt | LeaseLost]:
        """``complete_many`` for a resume run's batch: the same recording, and each entry
        of the answer a ``RecordedAttempt`` (the stage's state, attempt and error after it)
        instead of the whole stage, which a run only tallies (building hundreds of
        ``TxStage`` instances cost a tenth of a batch's time).

        Example:
            done = tracker.complete_batch(completions, owner="run-42")
            rejected = sum(d.state == StageState.REJECTED for d in done
                           if not isinstance(d, LeaseLost))
        """
        return self._complete_many(completions, owner, flow_run_id, brief=True).attempts()

    def _complete_many(self, completions: Sequence[Completion], owner: str,
                       flow_run_id: str | None, brief: bool = False) -> batches.Recorded:
        completions = _checked_completions(
            completions, "complete_batch" if brief else "complete_many")
        owner = check_owner(owner)
        if not completions:
            return batches.Recorded((), [])
        with self.engine.begin() as conn:
            return batches.apply_many(conn, completions, owner, self.clock(), self.rng,
                                      flow_run_id=flow_run_id, brief=brief)

    @rarer_young_collections()  # a batch makes thousands of short-lived objects
    def record_attempts(
        self, starts: Sequence[Start], completions: Sequence[Completion], *, owner: str,
        lease_seconds: float = 1800, flow_run_id: str | None = None,
    ) -> tuple[list[int | None], list[TxStage | LeaseLost]]:
        """``start_attempts`` and ``complete_many`` together, in one database transaction:
        what the task runs of one run ask for at the same moment (``tracking.recorder``).

        Example:
            attempts, recorded = tracker.record_attempts(
                [Start(uuid_b, "SAP", "main")],
                [Completion(uuid_a, "SAP", "main", ExecutionResult(0))], owner="run-42")

        Returns the attempt number of each start, in order (None: the stage is no longer
        reserved by ``owner``: do not call the platform), and ``complete_many``'s answer for
        the completions. The starts are written first; a start and a completion of the same
        stage do not belong in one call (the platform is called between them).
        """
        owner, lease_seconds = check_owner(owner), check_seconds(lease_seconds)
        completions = _checked_completions(completions, "record_attempts")
        if isinstance(starts, str | bytes) or not all(isinstance(s, Start) for s in starts):
            raise TypeError("record_attempts takes a list of tracking.store.Start entries, "
                            f"got {type(starts).__name__} holding other values")
        by_stage: dict[tuple[str, str], list[str]] = {}
        for start in starts:
            _check_strings(**start._asdict())
            by_stage.setdefault((start.platform, start.stage), []).append(start.uuid)
        if not starts and not completions:
            return [], []
        now = self.clock()
        started: dict[Start, int] = {}
        with self.engine.begin() as conn:
            for (platform, stage), uuids in by_stage.items():
                got = claims.start_attempts_in(conn, platform, stage, uuids, owner, now,
                                               lease_seconds)
                started.update((Start(u, platform, stage), n) for u, n in got.items())
            recorded = batches.apply_many(conn, completions, owner, now, self.rng,
                                          flow_run_id=flow_run_id) if completions else None
        return ([started.get(s) for s in starts],
                recorded.stages() if recorded is not None else [])

    # -- operator actions ------------------------------------------------------------------

    def cancel(self, uuid: str, *, reason: str, actor: str | None = None) -> TxProcess:
        """Cancel a transaction that is not final: its open stages become CANCELLED.

        A stage that is running right now finishes its attempt (it is recorded), but nothing
        runs after it; a stage reserved but not started is cancelled (its run skips it).
        """
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("cancel needs a reason")
        with self.engine.begin() as conn:
            _, tx = lock(conn, uuid)
            transitions.cancel(conn, tx, reason, actor, self.clock())
        return self.get_transaction(uuid)

    def requeue(
        self, uuid: str, *, actor: str | None = None, reason: str | None = None
    ) -> TxProcess:
        """Give a stopped transaction another go from its first unfinished stage.

        Allowed for EXHAUSTED, TERMINATED, REJECTED and CANCELLED transactions
        (``tracking.states.REQUEUABLE_TX_STATES``): the stage that stopped (and every later
        one) is PENDING again with a fresh set of attempts per the platform's current retry
        policy (the catalog's), due now. Completed stages are kept.
        """
        with self.engine.begin() as conn:
            stages, tx = lock(conn, uuid)
            transitions.requeue(conn, tx, stages, reason or "requeued", actor, self.clock())
        return self.get_transaction(uuid)

    def defer(self, uuid: str, *, until: datetime | str, reason: str | None = None,
              actor: str | None = None) -> TxProcess:
        """Postpone a waiting transaction: its next stage is not due before ``until`` (an
        aware datetime, or ISO 8601 text where naive is UTC), a DEFERRED event records it.

        Only waiting transactions (``states.WAITING_TX_STATES``) with no stage claimed or
        running right now (``InvalidTransition`` otherwise); ``until`` must be in the future.
        A later retry time already set is kept (the stage waits for the later of the two).
        """
        at, now = check_time(until, "until"), self.clock()
        if at is None or at <= now:
            raise ValueError(f"until must be in the future, got {until!r}")
        with self.engine.begin() as conn:
            stages, tx = lock(conn, uuid)
            transitions.defer(conn, tx, stages, at, reason or "deferred", actor, now)
        return self.get_transaction(uuid)

    # -- retention -------------------------------------------------------------------------

    def purge_preview(self, targets: Sequence[retention.Target]) -> list[retention.PurgePreview]:
        """What ``purge`` would delete now, per process and state (read-only)."""
        return retention.preview(self.engine, targets)

    def purge(
        self, targets: Sequence[retention.Target], archive: retention.Sink, *,
        chunk_size: int = retention.DEFAULT_CHUNK, actor: str | None = None,
        archive_path: str | None = None, archive_format: str | None = None,
        on_chunk: Callable[[str, int], None] | None = None,
    ) -> list[retention.PurgeTotals]:
        """Archive and delete the finished transactions each target purges (final states,
        finished before its cutoff; never a waiting or running one), ``chunk_size`` per
        database transaction. ``archive`` gets each chunk's records (with stages and events)
        and must make them durable before it returns: only then is the chunk deleted, with
        its row of the purge audit trail (``tx_purge``). A ``PurgeStopped`` says what was
        done before an error; the chunk it hit is untouched."""
        return retention.purge(
            self.engine, targets, archive, clock=self.clock, chunk_size=chunk_size,
            actor=actor, archive_path=archive_path, archive_format=archive_format,
            on_chunk=on_chunk,
        )

    def purge_history(self, process_code: str | None = None, *, limit: int = 100
                      ) -> list[retention.PurgeRecord]:
        """The purge audit trail (``tx_purge``), newest first."""
        return retention.history(self.engine, process_code, limit)

    # -- reading ---------------------------------------------------------------------------

    def get_stages(self, uuids: Sequence[str], platform: str, stage: str) -> list[TxStage]:
        """One platform stage of each of these transactions, in the order of ``uuids``."""
        return reads.get_stages(self.engine, uuids, platform, stage)

    def get_transaction(self, uuid: str) -> TxProcess:
        """The transaction with its ``stages`` (in order) and ``events`` (the audit trail)."""
        return reads.get_transaction(self.engine, uuid)


def _checked_completions(completions: Any, method: str) -> list[Completion]:
    if isinstance(completions, str | bytes) or not all(
        isinstance(c, Completion) for c in completions
    ):
        raise TypeError(f"{method} takes a list of tracking.store.Completion entries, "
                        f"got {type(completions).__name__} holding other values")
    return [
        c if isinstance(c.result, ExecutionResult)
        else Completion(c.uuid, c.platform, c.stage, to_result(c.result), c.task_run_id)
        for c in completions
    ]


def _check_strings(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")


def _check_uuids(uuids: Any) -> list[str]:
    if isinstance(uuids, str) or not all(isinstance(u, str) for u in uuids):
        raise ValueError(f"uuids must be a list of transaction uuids, got {uuids!r}")
    return list(uuids)
