"""When an item may run and by when it should be done: priority, not_before, deadline.

These travel *next to* a payload, never in it (they are not part of what deduplication
fingerprints). One rule checks them for every way in: ``Tracker.start_many`` (Python), the
files and items of ``tracking.items`` (CSV columns and JSON fields of these names), the
CLI and the HTTP API's ``POST /transactions``.

* ``priority``: a whole number, default 0; claims take higher priority first.
* ``not_before``: the first stage is not due before it (``max(now, not_before)``).
* ``deadline``: the item should be finished by then. With the process's SLA
  (``Process(sla=...)``) the item is *due* at the earlier of its deadline and
  ``created_at + sla`` (``due_at``, fixed at intake: a changed SLA applies to new items);
  past it, and not finished, it is *overdue*: claimed before anything else, and reported.

Times are timezone-aware UTC. A Python ``datetime`` must carry its time zone (a naive one
is refused, as everywhere in the Python API); text (files, CLI, HTTP) is ISO 8601, where a
value without an offset is UTC and a date alone is 00:00 UTC, as in the report windows.

Example:
    >>> s = Schedule.of(priority="5", deadline="2026-12-03T08:00Z")
    >>> s.priority, s.deadline.isoformat()
    (5, '2026-12-03T08:00:00+00:00')
    >>> split_record({"request_id": "FE-1", "priority": "2", "not_before": ""}).payload
    {'request_id': 'FE-1'}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

MIN_PRIORITY, MAX_PRIORITY = -(2**31), 2**31 - 1  # what an INTEGER column holds
#: The fields of an item (a CSV column, a JSON field) that are its schedule, not its payload.
RESERVED_FIELDS = ("priority", "not_before", "deadline")


def check_priority(value: Any, name: str = "priority") -> int:
    """A priority: an int, or the text of one (``"5"``); ``ValueError`` naming the value."""
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int) or not (
        MIN_PRIORITY <= number <= MAX_PRIORITY
    ):
        raise ValueError(
            f"{name} must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}, got {value!r}"
        )
    return number


def check_time(value: Any, name: str) -> datetime | None:
    """A point in time as an aware UTC datetime (None stays None).

    A ``datetime`` must be timezone-aware; text is ISO 8601 (``2026-12-03T08:00Z``), naive
    text is UTC and a date alone (``2026-12-03``) is 00:00 UTC. ``ValueError`` naming the
    value otherwise.
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                parsed = datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
            else:
                parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{name} must be an ISO 8601 date-time such as 2026-12-03T08:00Z, got {value!r}"
            ) from None
        value = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    elif not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime or ISO 8601 text, got {value!r}")
    elif value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got the naive {value!r}")
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"{name} is out of range: {value!r}") from None


@dataclass(frozen=True)
class Schedule:
    """An item's priority, earliest start and deadline (checked: build with ``of``)."""

    priority: int = 0
    not_before: datetime | None = None
    deadline: datetime | None = None

    @classmethod
    def of(cls, priority: Any = 0, not_before: Any = None, deadline: Any = None) -> Schedule:
        """The checked schedule (``ValueError`` naming the bad value)."""
        schedule = cls(check_priority(priority), check_time(not_before, "not_before"),
                       check_time(deadline, "deadline"))
        if schedule.not_before and schedule.deadline and schedule.deadline < schedule.not_before:
            raise ValueError(f"deadline ({schedule.deadline.isoformat()}) is before not_before "
                             f"({schedule.not_before.isoformat()})")
        return schedule

    def start_at(self, now: datetime) -> datetime:
        """When the first stage is due: ``max(now, not_before)``."""
        return now if self.not_before is None else max(now, self.not_before)

    def due_at(self, created_at: datetime, sla: timedelta | None) -> datetime | None:
        """When the item is overdue: the earlier of its deadline and ``created_at + sla``."""
        candidates = [self.deadline] if self.deadline is not None else []
        if sla is not None:
            try:
                candidates.append(created_at + sla)
            except OverflowError:  # an SLA reaching past the year 9999 is no bound
                pass
        return min(candidates, default=None)


@dataclass(frozen=True)
class Item:
    """A payload with its schedule, for ``Tracker.start_many`` and ``take_in``.

    Example:
        tracker.start_many("CANCELLATION", [
            Item({"request_id": "FE-1"}, priority=10, deadline=datetime(2026, 12, 3, tzinfo=UTC)),
            {"request_id": "FE-2"},                  # a plain payload: the call's defaults
        ])
    """

    payload: Mapping[str, Any]
    priority: Any = 0
    not_before: Any = None
    deadline: Any = None

    def schedule(self) -> Schedule:
        return Schedule.of(self.priority, self.not_before, self.deadline)


def split_record(record: Mapping[str, Any]) -> Item:
    """A record of a file (or of ``intake_flow(items=...)``) as an ``Item``: the reserved
    fields (``priority``, ``not_before``, ``deadline``) are its schedule, the rest its
    payload. An empty value (``""`` in CSV, ``null`` in JSON) means the default."""
    if not isinstance(record, Mapping) or not any(f in record for f in RESERVED_FIELDS):
        return Item(record)
    payload = {k: v for k, v in record.items() if k not in RESERVED_FIELDS}
    given = {f: record.get(f) for f in RESERVED_FIELDS}
    given = {f: None if v == "" else v for f, v in given.items()}
    return Item(payload, 0 if given["priority"] is None else given["priority"],
                given["not_before"], given["deadline"])


__all__ = ["MAX_PRIORITY", "MIN_PRIORITY", "RESERVED_FIELDS", "Item", "Schedule",
           "check_priority", "check_time", "split_record"]
