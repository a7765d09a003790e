"""Processes for the Prefect-layer tests (TRACKING_PROCESSES points here)."""

from __future__ import annotations

import threading
import time
from collections import Counter

from tracking import BusinessError, ExecutionResult, KeyFields, Process, RetryPolicy, SystemFailure
from tracking.decorator import TxContext

# What each behaviour returns or raises; the platform executes what the payload asks for.
BEHAVIOURS = {
    "ok": lambda: 0,
    "ok_result": lambda: ExecutionResult(0, "done"),
    "business": lambda: 5,
    "raise_business": lambda: (_ for _ in ()).throw(BusinessError(12, "customer unknown")),
    "system": lambda: -3,
    "raise_system": lambda: (_ for _ in ()).throw(SystemFailure(-7, "session expired")),
    "raise": lambda: 1 / 0,
    "bool": lambda: True,
    "float": lambda: 1.0,
    "str": lambda: "0",
    "none": lambda: None,
}

outcomes = Process("OUTCOMES", dedup=KeyFields("id"))


@outcomes.platform("P", order=1, retry=RetryPolicy(max_attempts=5), retries=2)
def do_what_the_payload_says(tx: TxContext):
    return BEHAVIOURS[tx.payload["behaviour"]]()


@outcomes.platform("Q", order=2, stages=("first", "second"))
def pass_through(tx: TxContext) -> int:
    return 0


# Counts executions per (uuid, stage) to prove nothing runs twice.
executions: Counter[tuple[str, str]] = Counter()
_lock = threading.Lock()

busy = Process("BUSY", dedup=KeyFields("id"))


def _count(tx: TxContext) -> int:
    with _lock:
        executions[(tx.uuid, f"{tx.platform}.{tx.stage}")] += 1
    time.sleep(0.002)
    return 0


busy.platform("A", order=1)(_count)
busy.platform("B", order=2)(_count)

processes = [outcomes, busy]

slow = Process("SLOW", dedup=KeyFields("id"))


@slow.platform("S", order=1, retry=RetryPolicy(max_attempts=3), timeout_seconds=0.5)
def too_slow(tx: TxContext) -> int:
    time.sleep(3)
    return 0


processes.append(slow)

# Calls that take a while (the payload says how long), counted like BUSY's; idempotent, so
# batch granularity records them a batch at a time (Tracker.complete_many).
slow_batch = Process("SLOW_BATCH", dedup=KeyFields("id"))


@slow_batch.platform("A", order=1, retry=RetryPolicy(max_attempts=1), idempotent=True)
def slow_call(tx: TxContext) -> int:
    with _lock:
        executions[(tx.uuid, f"{tx.platform}.{tx.stage}")] += 1
    time.sleep(float(tx.payload.get("sleep", 0.03)))
    return 0


processes.append(slow_batch)

# A platform without a limit (its six stages are runnable at once, so its calls overlap) before
# one with one licensed session (at most one call at a time, across runs: its stages become
# runnable while earlier ones run); ``peak`` is the most calls of each seen at once.
sessions = Process("SESSIONS", dedup=KeyFields("id"))
in_call: Counter[str] = Counter()
peak: Counter[str] = Counter()


def _occupy(tx: TxContext) -> int:
    with _lock:
        in_call[tx.platform] += 1
        peak[tx.platform] = max(peak[tx.platform], in_call[tx.platform])
    time.sleep(0.2 if tx.platform == "ROBOT" else 1.0)  # FREE calls overlap, if allowed
    with _lock:
        in_call[tx.platform] -= 1
    return 0


sessions.platform("FREE", order=1)(_occupy)
sessions.platform("ROBOT", order=2, concurrency=1)(_occupy)
processes.append(sessions)
