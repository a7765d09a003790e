"""Processes with and without a retention, for the retention tests (``TRACKING_PROCESSES=
tests.retention_processes:processes``).

``KEPT`` keeps finished transactions 30 days, ``FOREVER`` keeps them forever; both have one
platform ``A`` with one attempt, so an item is finished by one ``complete_stage``.
"""

from __future__ import annotations

from datetime import timedelta

from tracking import KeyFields, Platform, Process, RetryPolicy

kept = Process("KEPT", platforms=[Platform("A", order=1, retry=RetryPolicy(max_attempts=1))],
               dedup=KeyFields("id"), retention=timedelta(days=30))
forever = Process("FOREVER",
                  platforms=[Platform("A", order=1, retry=RetryPolicy(max_attempts=1))],
                  dedup=KeyFields("id"))
processes = [kept, forever]
