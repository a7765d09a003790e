"""Group commit of a run's attempts: the task runs of a resume run start and record their
attempts through one ``Recorder``, which writes what they ask for together.

A task run that starts an attempt (right before its call) or records its result queues the
request and waits until it is committed: the first to arrive writes everything queued so far
in one database transaction (``Tracker.record_attempts``: the starts, a statement per
platform stage, then the results, set-based as ``complete_many`` writes them), then hands the
pen to the first request that queued meanwhile. A lone task run is written at once; eight
busy ones share their transactions instead of queueing for SQLite's single writer one by one
(while they are busy, a writer waits ``LINGER_SECONDS`` for company before it writes).

Each request keeps its own semantics: an attempt starts (counts) before its call, a result
is committed before its task run ends, so a crash repeats at most the calls in flight; a
stage the run no longer holds raises ``LeaseLost`` for that request alone, and a database
error raises in every task run whose request was in the failed transaction.

Example (what ``tracking.decorator.execute`` does)::

    recorder = Recorder(tracker, owner="run-42", lease_seconds=1800)
    attempt = recorder.start(uuid, "SAP", "main")                  # or LeaseLost
    stage = recorder.complete(uuid, "SAP", "main", ExecutionResult(0))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tracking.errors import LeaseLost
from tracking.models import TxStage
from tracking.outcomes import ExecutionResult
from tracking.store import Completion, Start, Tracker
from tracking.store.claims import why_not_reserved

# When the run's last group held several requests (task runs are busy side by side), the
# next writer waits this long for more unless COMPANY are queued: a transaction of eight
# starts and eight results costs a fifth per stage of one alone. A lone task run (groups of
# one) never waits.
LINGER_SECONDS = 0.0005
COMPANY = 4


@dataclass(eq=False)
class _Request:
    """One start (``result`` None) or result to write, and what became of it."""

    uuid: str
    platform: str
    stage: str
    result: ExecutionResult | None = None
    task_run_id: str | None = None
    flow_run_id: str | None = None
    outcome: Any = None  # the attempt number, the recorded TxStage, or an exception
    written: bool = False
    lead: bool = False  # asked to write the next group
    wake: threading.Event = field(default_factory=threading.Event)

    def answer(self) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class Recorder:
    """Starts and records the attempts of one run (``owner``), grouped into shared database
    transactions (see the module docstring). Thread-safe: made for a run's task runs."""

    def __init__(self, tracker: Tracker, owner: str, lease_seconds: float) -> None:
        self.tracker, self.owner, self.lease_seconds = tracker, owner, lease_seconds
        self._lock = threading.Lock()
        self._queued: list[_Request] = []
        self._writing = False
        self._last_group = 1

    def start(self, uuid: str, platform: str, stage: str) -> int:
        """Start the attempt of a stage the run has reserved (``Tracker.start_attempt``):
        its number, or ``LeaseLost``; committed when this returns."""
        return int(self._submit(_Request(uuid, platform, stage)))

    def complete(self, uuid: str, platform: str, stage: str, result: ExecutionResult, *,
                 task_run_id: str | None = None, flow_run_id: str | None = None) -> TxStage:
        """Record a started attempt's result (``Tracker.complete_stage`` with the run as
        owner): the recorded stage, or ``LeaseLost``; committed when this returns."""
        stage_row: TxStage = self._submit(_Request(
            uuid, platform, stage, result, task_run_id, flow_run_id))
        return stage_row

    def _submit(self, request: _Request) -> Any:
        with self._lock:
            self._queued.append(request)
            lead = request.lead = not self._writing
            self._writing = True
        if not lead:
            request.wake.wait()
        if not request.written:  # this thread writes the group its request is in
            self._write_group()
        return request.answer()

    def _write_group(self) -> None:
        with self._lock:
            linger = self._last_group > 1 and len(self._queued) < COMPANY
        if linger:
            time.sleep(LINGER_SECONDS)
        with self._lock:
            group, self._queued = self._queued, []
            self._last_group = len(group)
        try:
            self._write(group)
        finally:
            with self._lock:
                for request in group:
                    request.written = True
                    request.wake.set()
                if self._queued:  # the first to queue meanwhile writes the next group
                    self._queued[0].lead = True
                    self._queued[0].wake.set()
                else:
                    self._writing = False

    def _write(self, group: Sequence[_Request]) -> None:
        try:
            self._write_together(group)
        except BaseException as exc:  # the leader is interrupted: nobody waits for nothing
            _fail(group, exc)
            raise

    def _write_together(self, group: Sequence[_Request]) -> None:
        """The group's starts and results in one database transaction; results that
        ``complete_many`` cannot take with the others (a second result for one transaction, or
        another flow run: never in a run, a caller of its own might) each in one more."""
        starts = [r for r in group if r.result is None]
        parts = _parts([r for r in group if r.result is not None])
        flow_run_id, first = parts[0] if parts else (None, [])
        try:
            attempts, recorded = self.tracker.record_attempts(
                [Start(r.uuid, r.platform, r.stage) for r in starts], _completions(first),
                owner=self.owner, lease_seconds=self.lease_seconds, flow_run_id=flow_run_id)
        except Exception as exc:  # this transaction failed: its requests say so
            _fail([*starts, *first], exc)
        else:
            for request, attempt in zip(starts, attempts, strict=True):
                # None: not reserved by this run any more: say why
                request.outcome = attempt if attempt is not None else self._why_not_started(
                    request)
            for request, outcome in zip(first, recorded, strict=True):
                request.outcome = outcome
        for flow_run_id, requests in parts[1:]:
            try:
                recorded = self.tracker.complete_many(
                    _completions(requests), owner=self.owner, flow_run_id=flow_run_id)
            except Exception as exc:
                _fail(requests, exc)
                continue
            for request, outcome in zip(requests, recorded, strict=True):
                request.outcome = outcome

    def _why_not_started(self, request: _Request) -> LeaseLost:
        return LeaseLost(why_not_reserved(self.tracker.engine, request.uuid, request.platform,
                                          request.stage, self.owner))


def _parts(results: list[_Request]) -> list[tuple[str | None, list[_Request]]]:
    """Results split where ``complete_many`` cannot take them together: one result per
    transaction, of one flow run (a run's results always fit in one part)."""
    parts: list[tuple[str | None, set[str], list[_Request]]] = []
    for request in results:
        for flow_run_id, uuids, part in parts:
            if flow_run_id == request.flow_run_id and request.uuid not in uuids:
                uuids.add(request.uuid)
                part.append(request)
                break
        else:
            parts.append((request.flow_run_id, {request.uuid}, [request]))
    return [(flow_run_id, part) for flow_run_id, _, part in parts]


def _completions(requests: Sequence[_Request]) -> list[Completion]:
    return [Completion(r.uuid, r.platform, r.stage, r.result, r.task_run_id)  # type: ignore[arg-type]
            for r in requests]


def _fail(requests: Sequence[_Request], exc: BaseException) -> None:
    """Answer ``exc`` to each request not answered yet (what committed keeps its answer)."""
    for request in requests:
        if request.outcome is None:
            request.outcome = exc
