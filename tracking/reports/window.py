"""The one window rule of every report: ``[start, end)`` in UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

DEFAULT_REPORT_WINDOW = timedelta(days=7)


def report_window(
    start: datetime | None, end: datetime | None, *, now: datetime,
    default: timedelta = DEFAULT_REPORT_WINDOW,
) -> tuple[datetime, datetime]:
    """The one window rule of every report (CLI, API, artifacts): ``[start, end)`` in UTC;
    ``end`` defaults to now, ``start`` to ``default`` (7 days) before ``end``; naive values
    are UTC. ``ValueError`` when ``start`` is after ``end`` or a value is out of range."""
    def utc(value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    try:
        stop = now if end is None else utc(end)
        begin = stop - default if start is None else utc(start)
    except (OverflowError, ValueError):
        raise ValueError("the report window is out of range") from None
    if begin > stop:
        raise ValueError(f"from ({begin.isoformat()}) is after to ({stop.isoformat()})")
    return begin, stop


def check_window(start: datetime, end: datetime) -> None:
    for name, value in (("start", start), ("end", end)):
        if not isinstance(value, datetime):
            raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
        if value.tzinfo is None:
            raise ValueError(f"{name} must be timezone-aware (UTC), got naive {value}")
    if start > end:
        raise ValueError(f"start ({start.isoformat()}) is after end ({end.isoformat()})")
