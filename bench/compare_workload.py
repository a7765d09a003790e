"""The workload of ``bench/compare.py``, shared by both sides (standard library only).

``compare.py`` (this project's venv) and ``compare_rpa_tracker_driver.py`` (the rpa-tracker
venv) both import it, so the two sides run exactly the same outcome pattern.

A process with platforms A (at most 1 attempt), B (at most 2) and C (unlimited), one stage
each, run in that order. Item ``i`` on a platform with shift A=0, B=3, C=6 has
``r = (i + shift) % 10``: ``r == 0`` is a business error; ``r == 1`` a system error on the
first attempt, and on later attempts too when ``(i // 10)`` is even (else a success);
anything else a success. Two hourly runs each process every runnable stage once, platform by
platform (A, then B, then C).
"""

from __future__ import annotations

PROCESS = "BENCH_COMPARE"
#: (code, order, max attempts (None: unlimited), shift)
PLATFORMS: tuple[tuple[str, int, int | None, int], ...] = (
    ("A", 1, 1, 0),
    ("B", 2, 2, 3),
    ("C", 3, None, 6),
)
RUNS = 2
BUSINESS_ERROR = 10
SYSTEM_ERROR = -5
_SHIFT = {code: shift for code, _, _, shift in PLATFORMS}


def outcome(i: int, platform: str, attempt: int) -> int:
    """The error code of attempt ``attempt`` (1-based) of item ``i`` on ``platform``."""
    r = (i + _SHIFT[platform]) % 10
    if r == 0:
        return BUSINESS_ERROR
    if r == 1 and (attempt == 1 or (i // 10) % 2 == 0):
        return SYSTEM_ERROR
    return 0


def description(code: int) -> str | None:
    if code > 0:
        return "bench: business error"
    if code < 0:
        return "bench: system error"
    return None
