"""Items in: reading them from files (CSV, JSON lines) and taking them in, in chunks.

Used by the intake flow, the CLI's ``tracking intake`` and ``App.intake`` alike, so a file
means the same everywhere and a big one is written a chunk per database transaction.

An item is a record: a CSV row or a JSON object. Its fields ``priority``, ``not_before``
and ``deadline`` (``tracking.schedule.RESERVED_FIELDS``) are its schedule, not part of its
payload: ``priority,not_before,deadline,request_id`` / ``5,,2026-12-03T17:00Z,FE-1`` is the
payload ``{"request_id": "FE-1"}`` with priority 5 and that deadline; an empty value is the
default (priority 0, no time).

Example:
    items = read_items("flows/data/cancellations.csv")
    summary = take_in(tracker, "ORDER_CANCELLATION", items, source="cancellations.csv")
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracking.schedule import Item, split_record
from tracking.store import Tracker
from tracking.store.intake import prepare

INTAKE_CHUNK = 1000  # items per database transaction


@dataclass(frozen=True)
class IntakeSummary:
    """What an intake did: counts, and the uuid of each item in order."""

    process: str
    total: int
    new: int
    uuids: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return self.total - self.new

    def as_dict(self) -> dict[str, Any]:
        return {"process": self.process, "total": self.total, "new": self.new,
                "duplicates": self.duplicates, "uuids": self.uuids}


def take_in(
    tracker: Tracker,
    process: str,
    items: Sequence[Any],
    *,
    source: str | None = None,
    chunk_size: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> IntakeSummary:
    """Start a transaction for each item that is not a duplicate, ``chunk_size`` items per
    database transaction. An item is a record (its reserved fields are its schedule, see
    the module docstring) or a ``tracking.schedule.Item``. Every item is validated first
    (``tracking.payloads``, ``tracking.schedule``): one bad item rejects the whole intake,
    naming it, before anything is written."""
    chunk_size = INTAKE_CHUNK if chunk_size is None else chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk size must be an int >= 1, got {chunk_size!r}")
    definition = tracker.process(process)
    items = [item if isinstance(item, Item) else split_record(item) for item in items]
    for number, item in enumerate(items, start=1):
        try:
            prepare(definition, [item])
        except ValueError as exc:
            raise ValueError(f"item {number}: {exc}") from None
    new, uuids = 0, []
    for start in range(0, len(items), chunk_size):
        chunk = items[start : start + chunk_size]
        results = tracker.start_many(process, chunk, source=source)
        new += sum(r.is_new for r in results)
        uuids.extend(r.uuid for r in results)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return IntakeSummary(process, len(items), new, uuids)


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """Items from a CSV file (header row) or a JSON-lines file (one object per line).

    ``.json`` files may also hold one list of objects. Raises ``ValueError`` naming the file
    and line for anything unreadable.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_items(path, text)
    if suffix == ".json" and text.lstrip().startswith("["):
        items = _json(path, text, 1)
        if not all(isinstance(i, dict) for i in items):
            raise ValueError(f"{path}: the JSON list must hold objects only")
        return items
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _jsonl_items(path, text)
    raise ValueError(f"{path}: unsupported file type {suffix!r} (use .csv, .jsonl or .json)")


def _csv_items(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or any(not (f or "").strip() for f in reader.fieldnames):
        raise ValueError(f"{path}: the first line must be a header with a name for every column")
    items = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}, line {reader.line_num}: wrong number of columns")
        items.append({k.strip(): v for k, v in row.items()})
    return items


def _json(path: Path, text: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{path}, line {line + exc.lineno - 1}"
        raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None


def _jsonl_items(path: Path, text: str) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item = _json(path, line, number)
        if not isinstance(item, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object")
        items.append(item)
    return items
