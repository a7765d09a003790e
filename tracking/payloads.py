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

MAX_PAYLOAD_DEPTH = 32
MAX_SOURCE_LENGTH = 100


def check_text(value: str, what: str) -> str:
    """Refuse strings the databases cannot store (NUL, lone surrogates)."""
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    if not value.isascii():  # only non-ASCII text can hold a lone surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{what} must be valid Unicode (no lone surrogates)") from None
    return value


def check_json_value(value: Any, max_depth: int = MAX_PAYLOAD_DEPTH) -> None:
    """Check that a value is JSON the databases can store, without recursion: objects with
    string keys, arrays, strings, finite numbers, booleans and null, nested at most
    ``max_depth`` levels (a value that contains itself is nested too deeply)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    push, pop = stack.append, stack.pop
    while stack:
        item, depth = pop()
        kind = type(item)
        # The exact types first: a payload holds mostly these, and type() is cheaper than
        # isinstance (subclasses, such as a StrEnum, are checked below).
        if kind is str:
            check_text(item, "payload strings")
        elif kind is int or kind is bool or item is None:
            continue
        elif kind is float or isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("payload numbers must be finite (no NaN or Infinity)")
        elif isinstance(item, dict):
            if depth > max_depth:
                raise ValueError(f"payload is nested deeper than {max_depth} levels")
            for key, child in item.items():
                if not isinstance(key, str):
                    raise ValueError(f"payload keys must be strings, got {key!r}")
                check_text(key, "payload keys")
                push((child, depth + 1))
        elif isinstance(item, list | tuple):
            if depth > max_depth:
                raise ValueError(f"payload is nested deeper than {max_depth} levels")
            for child in item:
                push((child, depth + 1))
        elif isinstance(item, str):
            check_text(item, "payload strings")
        elif not isinstance(item, int):
            raise ValueError(
                f"payload is not JSON-serialisable: a value of type {kind.__name__} "
                "(use strings, numbers, booleans, null, lists and objects)"
            )


def validate_payload(payload: Any) -> dict[str, Any]:
    """The payload as a plain dict, or ``ValueError`` saying what is wrong with it."""
    if not isinstance(payload, Mapping):
        raise ValueError(f"payload must be a JSON object (a mapping), got {type(payload).__name__}")
    clean = dict(payload)
    check_json_value(clean)
    return clean


def validate_source(source: Any) -> str | None:
    """Where items came from (a file name, ``api``): at most 100 characters."""
    if source is None:
        return None
    if not isinstance(source, str) or len(source) > MAX_SOURCE_LENGTH:
        raise ValueError(f"source must be a string of at most {MAX_SOURCE_LENGTH} characters")
    return check_text(source, "source")
