"""A process and a deterministic scenario for the CLI, report, view and HTML tests.

``TRACKING_PROCESSES=tests.sample_processes:process`` makes the CLI load ``process`` (the
seed library's CANCELLATION process: A with 1 attempt, B with two stages and 2 attempts, C
unlimited).

``build_scenario(tracker, clock, hours=24)`` feeds and runs items hour by hour like the hourly
deployment would, with a fixed mix of outcomes: completions, business rejections, system
errors that are retried (and sometimes exhausted), operator cancellations, and items still
waiting at the end.
"""

from __future__ import annotations

import random
from datetime import timedelta

import sqlalchemy as sa

from tests.conftest import FakeClock, cancellation_process
from tracking import ExecutionResult, Reports, Tracker, TxProcess
from tracking.connections import read_only

process = cancellation_process()
P = process.code
STEPS = [("A", "validate"), ("B", "process"), ("B", "confirm"), ("C", "main")]
# (probability, error code, description) per step; anything else succeeds.
FAILURES = {
    ("A", "validate"): [(0.06, 10, "customer is blocked in CRM"), (0.03, -1, "CRM unavailable")],
    ("B", "process"): [(0.10, -2, "SAP RFC timeout"), (0.04, 20, "order already shipped")],
    ("B", "confirm"): [(0.04, 21, "refund above the approval limit")],
    ("C", "main"): [(0.08, -3, "SMTP server unavailable")],
}


def _result(rng: random.Random, step: tuple[str, str]) -> ExecutionResult:
    roll = rng.random()
    for probability, code, description in FAILURES[step]:
        if roll < probability:
            return ExecutionResult(code, description)
        roll -= probability
    return ExecutionResult(0)


def run_once(tracker: Tracker, clock: FakeClock, rng: random.Random, owner: str,
             steps: list[tuple[str, str]] = STEPS) -> int:
    """One resume run: every runnable stage, platform by platform; returns stages run.

    Stages run one by one in business-key order, so the same seed gives the same history on
    every database (uuids aside).
    """
    done = 0
    for platform, stage in steps:
        due = tracker.get_pending_stages(P, platform, stage)
        keys = _business_keys(tracker, [s.uuid for s in due])
        for uuid in sorted(keys, key=keys.__getitem__):
            if not tracker.claim(P, platform, stage, owner=owner, limit=1, uuid=uuid):
                continue  # this run made its last attempt: a later run retries it
            clock.advance(round(rng.uniform(0.2, 3.0), 3))
            tracker.complete_stage(uuid, platform, _result(rng, (platform, stage)),
                                   stage=stage, owner=owner)
            done += 1
    return done


def _business_keys(tracker: Tracker, uuids: list[str]) -> dict[str, str]:
    table = TxProcess.__table__
    with read_only(tracker.engine) as conn:
        rows = conn.execute(sa.select(table.c.uuid, table.c.business_key)
                            .where(table.c.uuid.in_(uuids)))
        return {r.uuid: r.business_key for r in rows}


def build_scenario(tracker: Tracker, clock: FakeClock, hours: int = 24, seed: int = 7) -> None:
    """Intake and run items hour by hour from ``clock.now``; the last intake is only started."""
    rng = random.Random(seed)
    start = clock.now
    for hour in range(hours):
        clock.now = start + timedelta(hours=hour)
        count = 6 + (hour * 7) % 13
        items = [{"request_id": f"FE-{hour:03d}-{i:02d}", "amount": rng.randint(10, 5000)}
                 for i in range(count)]
        tracker.start_many(P, items, source="sample")
        last = hour == hours - 1
        run_once(tracker, clock, rng, f"run-{hour}", STEPS[:1] if last else STEPS)
        if hour % 5 == 2:  # an operator cancels the first waiting item of this hour
            prefix = f"FE-{hour:03d}-"
            waiting = [a for a in Reports(tracker.engine).aging(P)
                       if a.business_key.startswith(prefix)]
            if waiting:
                first = min(waiting, key=lambda a: a.business_key)
                tracker.cancel(first.uuid, reason="customer withdrew the request", actor="ops")
