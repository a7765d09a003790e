"""Processes for the API tests (``TRACKING_PROCESSES=tests.api_processes:processes``)."""

from __future__ import annotations

from tests.conftest import cancellation_process
from tracking import Platform, Process, RetryPolicy

cancellation = cancellation_process()

orders = Process(
    "ORDERS",
    platforms=[Platform("ERP", order=1, retry=RetryPolicy(max_attempts=3, delay=60))],
    description="Whole-payload dedup, one platform.",
)

processes = [cancellation, orders]
