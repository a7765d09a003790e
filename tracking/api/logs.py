"""Request correlation and structured logging for the API.

The request id of the request being served lives in a context variable; ``RequestIdFilter``
copies it onto every log record of the ``tracking.api`` logger, so each line of a request
carries it (worker threads inherit the context). ``configure_logging`` sets the logger up
once: text lines, or JSON lines when ``TRACKING_LOG_JSON`` is true.

Messages are short event names ("request", "transition") and the facts are fields passed
with ``extra=``: JSON lines hold them as keys, text lines append them as ``key=value``::

    2026-01-05T09:00:00.123Z INFO tracking.api request_id=4f0c... request method=POST
    path=/transactions status=201 duration_ms=2.31
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

LOGGER_NAME = "tracking.api"
logger = logging.getLogger(LOGGER_NAME)

_request_id: ContextVar[str | None] = ContextVar("tracking_api_request_id", default=None)
MAX_REQUEST_ID_LENGTH = 128
_SAFE_REQUEST_ID = re.compile(rf"^[A-Za-z0-9._:+=@/-]{{1,{MAX_REQUEST_ID_LENGTH}}}$")

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}


def current_request_id() -> str | None:
    """The id of the request being served (None outside a request)."""
    return _request_id.get()


def set_request_id(value: str | None) -> Any:
    """Make ``value`` the current request id; returns a token for ``reset_request_id``."""
    return _request_id.set(value)


def reset_request_id(token: Any) -> None:
    _request_id.reset(token)


def new_request_id() -> str:
    """A random UUID4 for correlation (``uuid.uuid4``: from the OS, so server processes
    forked from one parent never repeat each other's ids, as a shared PRNG state would)."""
    return str(uuid.uuid4())


def accept_request_id(header: str | None) -> str:
    """The client's ``X-Request-ID`` when it is safe to echo, a new UUID4 otherwise.

    Safe: 1-128 characters among letters, digits and ``. _ : + = @ / -`` (nothing that could
    split a log line or a header).
    """
    if header and _SAFE_REQUEST_ID.match(header):
        return header
    return new_request_id()


class RequestIdFilter(logging.Filter):
    """Puts the current request id on each record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get() or "-"
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id and the extras."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        data.update(_fields(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _one_line(text: str) -> str:
    """Escape control characters, so a client-sent path cannot forge or split log lines."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> request_id=<id> <message> key=value...`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = (
            f"{_timestamp(record)} {record.levelname} {record.name} "
            f"request_id={getattr(record, 'request_id', '-')} {record.getMessage()}"
        )
        if extras:
            line = f"{line} {extras}"
        line = _one_line(line)
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class _ApiHandler(logging.handlers.QueueHandler):
    """Hands records to a background thread that formats and writes them.

    The event loop only enqueues (the request id and the extras are already on the record);
    formatting and the ``write`` system call happen off the request path.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatted by the listener's handler (it needs the raw fields)


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Set up the ``tracking.api`` logger: level, request id filter, a stderr handler.

    Lines are written to stderr by a background thread. Calling it again (another app in the
    same process) updates level and format instead of adding a second handler. Records do not
    propagate to the root logger: Prefect installs a console handler there when a flow runs
    in the API process, which would print every line twice (without its fields).
    """
    global _listener
    logger.setLevel(level.upper())
    logger.propagate = False
    if not any(isinstance(f, RequestIdFilter) for f in logger.filters):
        logger.addFilter(RequestIdFilter())
    if _listener is None:
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        stream = logging.StreamHandler()
        _listener = logging.handlers.QueueListener(records, stream)
        _listener.start()
        atexit.register(_listener.stop)
        logger.addHandler(_ApiHandler(records))
    for handler in _listener.handlers:
        handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
