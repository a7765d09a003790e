"""Group commit of a run's attempts: the task runs of a resume run start and record their
attempts through one ``Recorder``, which writes what they ask for together.

A task run that starts an attempt (right before its call) or records its result queues the
request and waits until it is committed: the first to arrive writes everything queued so far
in one database transaction (``Tracker.start_attempts`` for the starts, one statement per
platform stage; ``Tracker.complete_many`` for the results), then hands the pen to the first
request that queued meanwhile. A lone task run is written at once; eight busy ones share
their transactions instead of queueing for SQLite's single writer one by one.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tracking.errors import LeaseLost
from tracking.models import TxStage
from tracking.outcomes import ExecutionResult
from tracking.store import Completion, Tracker
from tracking.store.claims import why_not_reserved


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
            group, self._queued = self._queued, []
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
            self._write_starts([r for r in group if r.result is None])
            self._write_results([r for r in group if r.result is not None])
        except BaseException as exc:  # the leader is interrupted: nobody waits for nothing
            _fail(group, exc)
            raise

    def _write_starts(self, starts: list[_Request]) -> None:
        if not starts:
            return
        by_stage: dict[tuple[str, str], list[_Request]] = {}
        for request in starts:
            by_stage.setdefault((request.platform, request.stage), []).append(request)
        for (platform, stage), requests in by_stage.items():
            try:
                started = self.tracker.start_attempts(
                    platform, stage, [r.uuid for r in requests], owner=self.owner,
                    lease_seconds=self.lease_seconds)
                for request in requests:
                    request.outcome = started.get(request.uuid)
                    if request.outcome is None:  # not reserved by this run any more: say why
                        request.outcome = self._why_not_started(request)
            except Exception as exc:  # this transaction failed: its requests say so
                _fail(requests, exc)

    def _why_not_started(self, request: _Request) -> LeaseLost:
        return LeaseLost(why_not_reserved(self.tracker.engine, request.uuid, request.platform,
                                          request.stage, self.owner))

    def _write_results(self, results: list[_Request]) -> None:
        if not results:
            return
        # complete_many takes one result per transaction and one flow run: a group is
        # split where it holds more (it never does in a run; a caller of its own might).
        parts: list[tuple[str | None, set[str], list[_Request]]] = []
        for request in results:
            for flow_run_id, uuids, part in parts:
                if flow_run_id == request.flow_run_id and request.uuid not in uuids:
                    uuids.add(request.uuid)
                    part.append(request)
                    break
            else:
                parts.append((request.flow_run_id, {request.uuid}, [request]))
        for flow_run_id, _, requests in parts:
            try:
                recorded = self.tracker.complete_many(
                    [Completion(r.uuid, r.platform, r.stage, r.result, r.task_run_id)
                     for r in requests],  # type: ignore[arg-type]
                    owner=self.owner, flow_run_id=flow_run_id)
            except Exception as exc:  # this transaction failed: its requests say so
                _fail(requests, exc)
                continue
            for request, outcome in zip(requests, recorded, strict=True):
                request.outcome = outcome


def _fail(requests: Sequence[_Request], exc: BaseException) -> None:
    """Answer ``exc`` to each request not answered yet (what committed keeps its answer)."""
    for request in requests:
        if request.outcome is None:
            request.outcome = exc
