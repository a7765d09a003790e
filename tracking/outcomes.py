"""Error codes and what they mean.

A platform reports how an attempt went with an integer error code:

* ``0``: success,
* ``> 0``: business error (the item is wrong; never retried, the transaction is rejected),
* ``< 0``: system error (the platform misbehaved; retried per the platform's RetryPolicy).

Example:
    >>> ExecutionResult(0).outcome
    <Outcome.SUCCESS: 'SUCCESS'>
    >>> ExecutionResult(-2, "SAP timeout").outcome
    <Outcome.SYSTEM_ERROR: 'SYSTEM_ERROR'>
    >>> to_result(True)
    Traceback (most recent call last):
    ...
    TypeError: error code must be an int, got bool (True)
"""

from __future__ import annotations

import enum
import traceback as _traceback
from dataclasses import dataclass
from typing import Any


class Outcome(enum.StrEnum):
    """What an attempt amounted to."""

    SUCCESS = "SUCCESS"
    BUSINESS_ERROR = "BUSINESS_ERROR"
    SYSTEM_ERROR = "SYSTEM_ERROR"


class ErrorType(enum.StrEnum):
    """The kind of error kept on a stage (``None`` when it succeeded)."""

    BUSINESS = "BUSINESS"
    SYSTEM = "SYSTEM"


def check_error_code(code: Any) -> int:
    """Return ``code`` if it is a real ``int``; raise ``TypeError`` otherwise.

    ``bool`` is refused on purpose: ``True`` is not business error 1.
    """
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"error code must be an int, got {type(code).__name__} ({code!r})")
    return code


def outcome_of(code: int) -> Outcome:
    """Map an error code to its outcome."""
    return _outcome(check_error_code(code))


def _outcome(code: int) -> Outcome:
    if code == 0:
        return Outcome.SUCCESS
    return Outcome.BUSINESS_ERROR if code > 0 else Outcome.SYSTEM_ERROR


@dataclass(frozen=True)
class ExecutionResult:
    """The result of one attempt at a platform: an error code and a description.

    ``traceback`` keeps the formatted traceback when the result comes from an exception.
    """

    error_code: int
    description: str | None = None
    traceback: str | None = None

    def __post_init__(self) -> None:
        check_error_code(self.error_code)
        if self.description is not None and not isinstance(self.description, str):
            raise TypeError(
                f"description must be a str or None, got {type(self.description).__name__}"
            )

    @property
    def outcome(self) -> Outcome:
        return _outcome(self.error_code)  # an int: checked when the result was made

    @property
    def error_type(self) -> ErrorType | None:
        return _ERROR_TYPES[self.outcome]


_ERROR_TYPES = {
    Outcome.SUCCESS: None,
    Outcome.BUSINESS_ERROR: ErrorType.BUSINESS,
    Outcome.SYSTEM_ERROR: ErrorType.SYSTEM,
}


class BusinessError(Exception):
    """Raise from a platform function to reject the item (never retried).

    Example:
        raise BusinessError(12, "customer has open invoices")
    """

    def __init__(self, code: int = 1, message: str = "business error") -> None:
        check_error_code(code)
        if code <= 0:
            raise ValueError(f"a business error code must be > 0, got {code}")
        super().__init__(message)
        self.code = code
        self.message = message


class SystemFailure(Exception):
    """Raise from a platform function for a retryable failure with a specific code.

    Any other uncaught exception is a system error with code ``-1``.

    Example:
        raise SystemFailure(-5, "SAP session expired")
    """

    def __init__(self, code: int = -1, message: str = "system error") -> None:
        check_error_code(code)
        if code >= 0:
            raise ValueError(f"a system error code must be < 0, got {code}")
        super().__init__(message)
        self.code = code
        self.message = message


def to_result(value: Any) -> ExecutionResult:
    """Normalise what a platform returned (an int or an ExecutionResult) to a result.

    Raises ``TypeError`` for anything else (bool, float, str, None, ...).
    """
    if isinstance(value, ExecutionResult):
        return value
    return ExecutionResult(check_error_code(value))


def result_from_exception(exc: BaseException) -> ExecutionResult:
    """The result an uncaught exception stands for, with its traceback kept."""
    tb = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, BusinessError):
        return ExecutionResult(exc.code, exc.message, tb)
    if isinstance(exc, SystemFailure):
        return ExecutionResult(exc.code, exc.message, tb)
    description = f"{type(exc).__name__}: {exc}"
    return ExecutionResult(-1, description, tb)
