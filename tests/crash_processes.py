"""The process of the crash proofs (tests/test_proof_crash.py): PROOF's outcome pattern, with
a pause in every platform call so that kills land while calls are running.

``TRACKING_PROCESSES=tests.crash_processes:processes`` loads it; ``TRACKING_PROOF_SLEEP`` is
the pause (seconds, default 0.01) and ``TRACKING_PROOF_SIDE_EFFECTS`` the side-effect log.
"""

from __future__ import annotations

import os
import time

from tests.proof_processes import PLATFORMS, RULES, SLEEP_ENV, item_index, outcome
from tests.proof_processes import record_side_effect as _record
from tracking import KeyFields, Process, RetryPolicy
from tracking.decorator import TxContext

crash = Process("CRASH", dedup=KeyFields("key"))


def _crash_platform(platform: str):
    def call(tx: TxContext) -> int:
        _record(tx)  # the side effect happens, then the call takes a while to return
        time.sleep(float(os.environ.get(SLEEP_ENV, "0.01")))
        return outcome(platform, item_index(tx), tx.attempt)

    call.__name__ = f"crash_{platform.lower()}"
    return call


for _order, _code in enumerate(PLATFORMS, start=1):
    crash.platform(_code, order=_order,
                   retry=RetryPolicy(max_attempts=RULES[_code][0], delay=0))(_crash_platform(_code))

processes = [crash]
