"""The tracker's errors: every one a ``TrackingError``.

The CLI maps them to exit codes and the API to HTTP statuses; Python callers catch them:

    try:
        tracker.complete_stage(uuid, "SAP", 0, owner=run_id)
    except LeaseLost:
        ...  # another run took the stage over: do not report this attempt
"""

from __future__ import annotations


class TrackingError(Exception):
    """Base class of the tracker's errors."""


class UnknownProcessError(TrackingError, ValueError):
    """The process code is not registered with this tracker."""


class TransactionNotFound(TrackingError, LookupError):
    """No transaction has this uuid."""


class InvalidTransition(TrackingError):
    """The requested change is not allowed from the current state."""


class DatabaseUnavailable(TrackingError):
    """The tracking database failed or went away (the message names it, without password)."""


class LeaseLost(InvalidTransition):
    """The stage is no longer claimed by this owner (its lease expired and was taken over)."""
