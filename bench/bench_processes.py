"""The processes of the Prefect benchmark (``bench/bench_prefect.py``): one no-op platform
(stage granularity), and three idempotent no-op platforms (batch granularity).

``TRACKING_PROCESSES=bench.bench_processes:processes`` (the repository root on ``sys.path``).
"""

from __future__ import annotations

from tracking import KeyFields, Process
from tracking.decorator import TxContext

PROCESS = "BENCH_NOOP"
BATCH_PROCESS = "BENCH_BATCH"
BATCH_PLATFORMS = ("A", "B", "C")

process = Process(PROCESS, dedup=KeyFields("id"), description="Prefect benchmark: a no-op")


@process.platform("NOOP", order=1)
def noop(tx: TxContext) -> int:
    """Does nothing: what is measured is the tracking and Prefect around it."""
    return 0


batch_process = Process(BATCH_PROCESS, dedup=KeyFields("id"),
                        description="Prefect benchmark: three idempotent no-op platforms")
for order, code in enumerate(BATCH_PLATFORMS, start=1):
    batch_process.platform(code, order=order, idempotent=True)(noop)

processes = [process, batch_process]
