"""Retry policies: how many attempts a platform gets and when the next one is due.

Example:
    >>> p = RetryPolicy(max_attempts=4, delay=60, backoff=2, max_delay=150)
    >>> [p.delay_after(n) for n in (1, 2, 3)]
    [60.0, 120.0, 150.0]
    >>> p.is_exhausted(4)
    True
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


def _seconds(value: float | int | timedelta | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


# The longest wait a policy can ask for (a retry due later than this is no retry).
MAX_DELAY_SECONDS = 10 * 365 * 86_400.0


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and back-off for a platform's system errors.

    Attributes:
        max_attempts: attempts allowed in all (first one included); ``None`` is unlimited.
        delay: seconds (or a timedelta) before the first retry.
        backoff: multiplier applied to the delay after each further attempt.
        max_delay: cap on the delay, in seconds; ``None`` is no cap.
        jitter: up to this many seconds are added or taken off at random.

    Attempts made by hourly runs and by Prefect's in-run retries count against the
    same ``max_attempts``. Business errors are never retried.
    """

    max_attempts: int | None = None
    delay: float = 0.0
    backoff: float = 1.0
    max_delay: float | None = None
    jitter: float = 0.0

    def __post_init__(self) -> None:
        m = self.max_attempts
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"max_attempts must be an int >= 1 or None, got {m!r}")
        object.__setattr__(self, "delay", _seconds(self.delay, "delay"))
        object.__setattr__(self, "max_delay", _seconds(self.max_delay, "max_delay"))
        object.__setattr__(self, "jitter", _seconds(self.jitter, "jitter"))
        b = self.backoff
        if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b < 1:
            raise ValueError(f"backoff must be a finite number >= 1, got {b!r}")
        object.__setattr__(self, "backoff", float(b))

    def is_exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` attempts use up the policy."""
        return self.max_attempts is not None and attempts >= self.max_attempts

    def delay_after(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        try:
            seconds = self.delay * self.backoff ** (attempt - 1)
        except OverflowError:  # many attempts of a steep back-off: the cap applies
            seconds = math.inf if self.delay else 0.0
        seconds = min(seconds, MAX_DELAY_SECONDS)
        if self.max_delay is not None:
            seconds = min(seconds, self.max_delay)
        if self.jitter:
            seconds += (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, seconds)

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_attempts": self.max_attempts,
            "delay": self.delay,
            "backoff": self.backoff,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
        }
