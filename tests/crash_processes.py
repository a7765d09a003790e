"""The process of the crash proofs (tests/prefect/test_proof_crash.py): PROOF's outcome
pattern, with a pause in every platform call so that kills land while calls are running.

``TRACKING_PROCESSES=tests.crash_processes:processes`` loads it; ``TRACKING_PROOF_SLEEP`` is
the pause (seconds, default 0.01) and ``TRACKING_PROOF_SIDE_EFFECTS`` the side-effect log.
"""

from __future__ import annotations

from tests.proof_processes import pattern_process

crash = pattern_process("CRASH", pause=True)
processes = [crash]
