"""Deduplication strategies: turn a payload into a fingerprint and a business key.

The database holds ``UNIQUE(process_code, fingerprint)``, so two submissions of the same item
create one transaction even when they race.

Example:
    >>> KeyFields("request_id").business_key({"request_id": "FE-1", "name": "x"})
    'FE-1'
    >>> len(PayloadHash().fingerprint({"a": 1}))
    64
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# What json.dumps(sort_keys=True, separators=(",", ":"), allow_nan=False) would make a new
# encoder for at each call: fingerprints must not change, so the settings must not either.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces; raises ``ValueError`` if not serialisable."""
    try:
        return _CANONICAL.encode(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"payload is not JSON-serialisable: {exc}") from None


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class DedupStrategy(Protocol):
    """What a deduplication strategy provides."""

    name: str

    def fingerprint(self, payload: Mapping[str, Any]) -> str: ...

    def business_key(self, payload: Mapping[str, Any]) -> str: ...

    def describe(self) -> dict[str, Any]: ...


def _is_blank(value: Any) -> bool:
    """True for a string that is empty or only whitespace (a key that identifies nothing)."""
    return isinstance(value, str) and not value.strip()


@dataclass(frozen=True, init=False)
class KeyFields:
    """Items are the same when these payload fields are equal.

    A field that is missing, null, or a blank string (empty or only whitespace) is an error:
    blank keys would make every such item a duplicate of the first one. Non-string values
    (ints...) are fine.
    """

    fields: tuple[str, ...]
    name = "key_fields"

    def __init__(self, *fields: str) -> None:
        if not fields:
            raise ValueError("KeyFields needs at least one field name")
        for f in fields:
            if not isinstance(f, str) or not f:
                raise ValueError(f"KeyFields field names must be non-empty strings, got {f!r}")
        object.__setattr__(self, "fields", tuple(fields))

    def _values(self, payload: Mapping[str, Any]) -> list[Any]:
        missing = [f for f in self.fields if payload.get(f) is None]
        if missing:
            raise ValueError(
                f"payload lacks dedup key field(s) {', '.join(map(repr, missing))}"
            )
        blank = [f for f in self.fields if _is_blank(payload[f])]
        if blank:
            raise ValueError(
                "dedup key field(s) "
                + ", ".join(f"{f!r} (value {payload[f]!r})" for f in blank)
                + " must not be blank"
            )
        return [payload[f] for f in self.fields]

    def fingerprint(self, payload: Mapping[str, Any]) -> str:
        return _sha256(canonical_json(self._values(payload)))

    def business_key(self, payload: Mapping[str, Any]) -> str:
        return "/".join(str(v) for v in self._values(payload))

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "fields": list(self.fields)}


@dataclass(frozen=True)
class PayloadHash:
    """Items are the same when their whole payloads are equal (key order does not matter)."""

    name = "payload_hash"

    def fingerprint(self, payload: Mapping[str, Any]) -> str:
        return _sha256(canonical_json(payload))

    def business_key(self, payload: Mapping[str, Any]) -> str:
        return self.fingerprint(payload)[:12]

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "fields": []}


@dataclass(frozen=True)
class Custom:
    """Items are the same when ``key(payload)`` returns the same non-blank string.

    An empty or whitespace-only key is an error (it would merge unrelated items).

    Example:
        Custom(lambda p: f"{p['customer']}:{p['date']}")
    """

    key: Callable[[Mapping[str, Any]], str]
    name = "custom"

    def _key(self, payload: Mapping[str, Any]) -> str:
        key = self.key(payload)
        if not isinstance(key, str) or _is_blank(key):
            raise ValueError(
                f"custom dedup key must be a non-blank string (not empty or only "
                f"whitespace), got {key!r}"
            )
        return key

    def fingerprint(self, payload: Mapping[str, Any]) -> str:
        return _sha256(self._key(payload))

    def business_key(self, payload: Mapping[str, Any]) -> str:
        return self._key(payload)

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "fields": [], "key": getattr(self.key, "__name__", "")}


def as_strategy(value: DedupStrategy | Callable[[Mapping[str, Any]], str] | None) -> DedupStrategy:
    """Accept a strategy, a plain callable (wrapped in ``Custom``) or None (``PayloadHash``)."""
    if value is None:
        return PayloadHash()
    if isinstance(value, KeyFields | PayloadHash | Custom):
        return value
    if hasattr(value, "fingerprint") and hasattr(value, "business_key"):
        return value  # a user-defined strategy following the protocol
    if callable(value):
        return Custom(value)
    raise TypeError(f"dedup must be a strategy or a callable, got {value!r}")
