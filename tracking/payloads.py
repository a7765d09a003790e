"""What an item's payload may hold: the one validation every way in uses.

The store checks each payload before writing it (``Tracker.start_many``), so the Python API,
the CLI's files and the HTTP API refuse the same bad input with the same message.

Example:
    >>> validate_payload({"request_id": "FE-1"})
    {'request_id': 'FE-1'}
    >>> validate_payload({"note": "a\\x00b"})
    Traceback (most recent call last):
    ...
    ValueError: payload strings must not contain NUL characters
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tracking.dedup import canonical_json

MAX_PAYLOAD_DEPTH = 32
MAX_SOURCE_LENGTH = 100


def check_text(value: str, what: str) -> str:
    """Refuse strings the databases cannot store (NUL, lone surrogates)."""
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode (no lone surrogates)") from None
    return value


def check_json_value(value: Any, max_depth: int = MAX_PAYLOAD_DEPTH) -> None:
    """Check nesting depth, strings and numbers of a parsed JSON value, without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            if depth > max_depth:
                raise ValueError(f"payload is nested deeper than {max_depth} levels")
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ValueError(f"payload keys must be strings, got {key!r}")
                check_text(key, "payload keys")
                stack.append((child, depth + 1))
        elif isinstance(item, list | tuple):
            if depth > max_depth:
                raise ValueError(f"payload is nested deeper than {max_depth} levels")
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            check_text(item, "payload strings")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("payload numbers must be finite (no NaN or Infinity)")


def validate_payload(payload: Any) -> dict[str, Any]:
    """The payload as a plain dict, or ``ValueError`` saying what is wrong with it."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a JSON object (a mapping), got {type(payload).__name__}")
    check_json_value(payload)
    canonical_json(payload)  # raises ValueError when not JSON-serialisable
    return dict(payload)


def validate_source(source: Any) -> str | None:
    """Where items came from (a file name, ``api``): at most 100 characters."""
    if source is None:
        return None
    if not isinstance(source, str) or len(source) > MAX_SOURCE_LENGTH:
        raise ValueError(f"source must be a string of at most {MAX_SOURCE_LENGTH} characters")
    return check_text(source, "source")
