"""A process with an SLA, a retention and a session limit, for the CLI tests of priority,
defer, deadline and SLA (``TRACKING_PROCESSES=tests.schedule_processes:process``)."""

from __future__ import annotations

from datetime import timedelta

from tests.conftest import cancellation_process
from tracking import Platform, Process

_base = cancellation_process()
process = Process(
    _base.code,
    platforms=[Platform(p.code, order=p.order, stages=p.stages, retry=p.retry,
                        concurrency=2 if p.code == "B" else None) for p in _base.platforms],
    dedup=_base.dedup,
    description="CANCELLATION with an SLA",
    sla=timedelta(hours=4),
    retention=timedelta(days=90),
)
P = process.code
