"""The process of the Prefect benchmark (``bench/bench_prefect.py``): one no-op platform.

``TRACKING_PROCESSES=bench.bench_processes:process`` (the repository root on ``sys.path``).
"""

from __future__ import annotations

from tracking import KeyFields, Process
from tracking.decorator import TxContext

PROCESS = "BENCH_NOOP"

process = Process(PROCESS, dedup=KeyFields("id"), description="Prefect benchmark: a no-op")


@process.platform("NOOP", order=1)
def noop(tx: TxContext) -> int:
    """Does nothing: what is measured is the tracking and Prefect around it."""
    return 0
