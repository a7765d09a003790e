"""Processes of the standing proofs (tests/prefect/test_proof_*.py), run in worker subprocesses.

``TRACKING_PROCESSES=tests.proof_processes:processes`` loads them. Every platform call
appends one line to the side-effect log named by ``TRACKING_PROOF_SIDE_EFFECTS`` (when set):
``<uuid> <platform> <stage> <attempt> <pid>``, written with one ``write`` on a file opened
with ``O_APPEND``, so lines of concurrent processes never interleave. The log is what the
outside world saw; the tests compare it with the ATTEMPT events the tracker recorded.

* ``PROOF``: three platforms whose outcome is a deterministic function of the item's index
  ``n`` (payload field, an int or a numeric string) and the attempt: mostly success, some
  business errors, some system errors on the first attempt only (retried with delay 0), and
  one pattern that always fails on B (exhausted). ``expected(n)`` is the final picture any
  correct run order (one worker or many) must produce.
* ``OUTAGE``: two platforms that always succeed after sleeping ``TRACKING_PROOF_SLEEP``
  seconds (default 0.02) per call.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tracking import KeyFields, Process, RetryPolicy
from tracking.decorator import TxContext

SIDE_EFFECTS_ENV = "TRACKING_PROOF_SIDE_EFFECTS"
SLEEP_ENV = "TRACKING_PROOF_SLEEP"


def record_side_effect(tx: TxContext) -> None:
    """Append ``uuid platform stage attempt pid`` to the side-effect log (one write)."""
    path = os.environ.get(SIDE_EFFECTS_ENV)
    if not path:
        return
    line = f"{tx.uuid} {tx.platform} {tx.stage} {tx.attempt} {os.getpid()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


# -- PROOF: a deterministic mix of outcomes --------------------------------------------------

# platform -> (max_attempts, rules); a rule is (modulus, remainder, error code, first attempt
# only?). The first rule that matches n decides; no match is success.
RULES: dict[str, tuple[int | None, list[tuple[int, int, int, bool]]]] = {
    "A": (3, [(37, 5, 11, False), (10, 3, -21, True)]),
    "B": (2, [(41, 2, 12, False), (29, 7, -22, False), (7, 1, -23, True)]),
    "C": (None, [(53, 9, 13, False), (8, 6, -24, True)]),
}
PLATFORMS = ("A", "B", "C")


def outcome(platform: str, n: int, attempt: int) -> int:
    """The error code platform ``platform`` returns for item ``n`` at ``attempt``."""
    for modulus, remainder, code, first_only in RULES[platform][1]:
        if n % modulus == remainder:
            if code < 0 and first_only and attempt > 1:
                return 0
            return code
    return 0


@dataclass(frozen=True)
class Expected:
    """The final state of item ``n``: the transaction's, and each platform's (state, attempts)."""

    tx_state: str
    stages: dict[str, tuple[str, int]]


def expected(n: int) -> Expected:
    """What every correct processing of item ``n`` ends with (each attempt counted once)."""
    stages: dict[str, tuple[str, int]] = {}
    tx_state = "COMPLETED"
    for platform in PLATFORMS:
        if tx_state != "COMPLETED":
            stages[platform] = ("CANCELLED" if tx_state == "REJECTED" else "PENDING", 0)
            continue
        max_attempts = RULES[platform][0]
        attempt = 0
        while True:
            attempt += 1
            code = outcome(platform, n, attempt)
            if code == 0:
                stages[platform] = ("COMPLETED", attempt)
                break
            if code > 0:
                stages[platform] = ("REJECTED", attempt)
                tx_state = "REJECTED"
                break
            if max_attempts is not None and attempt >= max_attempts:
                stages[platform] = ("EXHAUSTED", attempt)
                tx_state = "EXHAUSTED"
                break
    return Expected(tx_state, stages)


def item_index(tx: TxContext) -> int:
    return int(tx.payload["n"])


def pattern_process(code: str, *, pause: bool = False) -> Process:
    """A process of the three platforms of the outcome pattern. With ``pause`` each call
    sleeps ``TRACKING_PROOF_SLEEP`` seconds after its side effect (so kills land mid-call)."""
    process = Process(code, dedup=KeyFields("key"))

    def platform_call(platform: str):
        def call(tx: TxContext) -> int:
            record_side_effect(tx)
            if pause:
                time.sleep(float(os.environ.get(SLEEP_ENV, "0.01")))
            return outcome(platform, item_index(tx), tx.attempt)

        call.__name__ = f"{code.lower()}_{platform.lower()}"
        return call

    for order, platform in enumerate(PLATFORMS, start=1):
        retry = RetryPolicy(max_attempts=RULES[platform][0], delay=0)
        process.platform(platform, order=order, retry=retry)(platform_call(platform))
    return process


proof = pattern_process("PROOF")


def proof_items(start: int, count: int) -> list[dict[str, object]]:
    """Items ``start .. start+count-1`` of PROOF (key ``P<n>``)."""
    return [{"key": f"P{n:07d}", "n": n} for n in range(start, start + count)]


# -- OUTAGE: slow, always successful ----------------------------------------------------------

outage = Process("OUTAGE", dedup=KeyFields("key"))


def _slow_success(tx: TxContext) -> int:
    time.sleep(float(os.environ.get(SLEEP_ENV, "0.02")))
    record_side_effect(tx)
    return 0


outage.platform("X", order=1, retry=RetryPolicy(max_attempts=4, delay=0))(_slow_success)
outage.platform("Y", order=2, retry=RetryPolicy(max_attempts=4, delay=0))(_slow_success)

processes = [proof, outage]
