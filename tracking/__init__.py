"""Transaction tracking for business-process automation on Prefect 3 and SQLModel.

Example:
    from tracking import Platform, Process, RetryPolicy, KeyFields, Tracker, connect

    process = Process("CANCELLATION", platforms=[Platform("A", order=1)],
                      dedup=KeyFields("request_id"))
    tracker = Tracker(connect("sqlite:///tracking.db", migrate=True), processes=[process])
    uuid, is_new = tracker.start_or_resume("CANCELLATION", {"request_id": "FE-1"})
"""

from importlib.metadata import PackageNotFoundError, version

from tracking.catalog import Platform, Process, load_processes
from tracking.db import connect
from tracking.decorator import TxContext
from tracking.dedup import Custom, KeyFields, PayloadHash
from tracking.errors import (
    DatabaseUnavailable,
    InvalidTransition,
    LeaseLost,
    TrackingError,
    TransactionNotFound,
    UnknownProcessError,
)
from tracking.models import EventKind, StageState, TxEvent, TxProcess, TxStage, TxState
from tracking.outcomes import BusinessError, ExecutionResult, Outcome, SystemFailure
from tracking.policy import RetryPolicy
from tracking.reports import Reports
from tracking.schedule import Item
from tracking.store import Completion, RecordedAttempt, Start, Tracker

try:
    __version__ = version("prefect-tracking")
except PackageNotFoundError:  # imported from a checkout that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "BusinessError",
    "Completion",
    "Custom",
    "DatabaseUnavailable",
    "EventKind",
    "ExecutionResult",
    "InvalidTransition",
    "Item",
    "KeyFields",
    "LeaseLost",
    "Outcome",
    "PayloadHash",
    "Platform",
    "Process",
    "RecordedAttempt",
    "Reports",
    "RetryPolicy",
    "StageState",
    "Start",
    "SystemFailure",
    "Tracker",
    "TrackingError",
    "TransactionNotFound",
    "TxEvent",
    "TxProcess",
    "TxStage",
    "TxContext",
    "TxState",
    "UnknownProcessError",
    "__version__",
    "connect",
    "load_processes",
]
