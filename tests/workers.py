"""Functions run in child processes by the concurrency tests (importable under spawn)."""

from __future__ import annotations

import os
import signal
import time

from tests.conftest import cancellation_process
from tracking import Tracker, connect


def _tracker(url: str) -> Tracker:
    return Tracker(connect(url, migrate=True), processes=[cancellation_process()])


def submit_same_item(url: str, barrier, results) -> None:
    tracker = _tracker(url)
    barrier.wait()
    results.put(tracker.start_or_resume("CANCELLATION", {"request_id": "SAME-1", "n": os.getpid()}))


def claim_until_empty(url: str, owner: str, barrier, results) -> None:
    tracker = _tracker(url)
    claimed: list[int] = []
    barrier.wait()
    while True:
        batch = tracker.claim("CANCELLATION", "A", owner=owner, limit=7)
        if not batch:
            break
        claimed.extend(s.id for s in batch)
        for s in batch:
            tracker.complete_stage(s.uuid, "A", 0, owner=owner)
    results.put(claimed)


def claim_then_die(url: str, ready, start: int = 0) -> None:
    """Claim every runnable A stage with a short lease, start the attempts of ``start`` of
    them, then get killed before completing any."""
    tracker = _tracker(url)
    stages = tracker.claim("CANCELLATION", "A", owner="doomed", limit=100, lease_seconds=1)
    for s in stages[:start]:
        tracker.start_attempt(s.uuid, "A", "validate", owner="doomed", lease_seconds=1)
    ready.set()
    time.sleep(60)  # the parent sends SIGKILL long before this ends
    os.kill(os.getpid(), signal.SIGKILL)
