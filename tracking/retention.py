"""What a purge needs besides the database: retention durations, and the archive file.

Durations are written ``90d``, ``12h``, ``30m``, ``2w`` (or combined: ``1d12h``; ``s`` for
seconds): ``parse_duration`` reads them, ``format_duration`` writes them.

An archive holds one record per purged transaction: its columns, with its ``stages`` and its
``events`` (the audit trail) nested, timestamps as ISO 8601 UTC strings.

* **JSON lines** (``.jsonl``, the default): one JSON object per line.
* **CSV** (``.csv``): a header row, then one row per transaction; the columns of
  ``CSV_COLUMNS``, where ``payload``, ``stages``, ``events`` and ``extra`` hold JSON (the
  same objects as in JSON lines; ``extra``: every other column of the transaction, so a
  column added to the schema later is archived too).

``Archive`` appends to the file, so one file can collect many purges. It is written for
crashes: each chunk's records are written, flushed and fsynced before the database deletes
that chunk; on opening, a record cut short by a crash (the file's torn tail, never deleted
from the database) is cut off, and a record already in the file (archived, then not deleted
because the purge stopped) is not written again, so a purge repeated after a crash neither
loses nor duplicates a transaction. One purge at a time writes a file (an exclusive lock).

Example:
    with Archive("purge-2026-01.jsonl") as archive:
        written = archive.write(records)      # durable when it returns
    for record in read_archive("purge-2026-01.jsonl"):
        print(record["uuid"], len(record["events"]))
"""

from __future__ import annotations

import csv
import enum
import fcntl
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Literal

ArchiveFormat = Literal["jsonl", "csv"]
FORMATS: tuple[ArchiveFormat, ...] = ("jsonl", "csv")
UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+)([wdhms])")
_DURATION = re.compile(r"(?:\d+[wdhms])+")
#: The columns of a CSV archive; the last four hold JSON.
CSV_COLUMNS = ("uuid", "process_code", "business_key", "fingerprint", "source", "state",
               "created_at", "updated_at", "finished_at", "payload", "stages", "events",
               "extra")
_JSON_COLUMNS = ("payload", "stages", "events", "extra")


# -- durations -------------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """``90d`` -> 90 days (units: w, d, h, m, s; ``1d12h`` combines them); ``ValueError``
    naming the value for anything else, zero included."""
    cleaned = text.strip().lower() if isinstance(text, str) else ""
    if not _DURATION.fullmatch(cleaned):
        raise ValueError(
            f"bad duration {text!r}: use a whole number and a unit, e.g. 90d, 12h, 30m or 2w "
            "(w weeks, d days, h hours, m minutes, s seconds)"
        )
    seconds = sum(int(n) * UNITS[unit] for n, unit in _PART.findall(cleaned))
    if seconds <= 0:
        raise ValueError(f"bad duration {text!r}: it must be longer than zero")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"bad duration {text!r}: too long") from None


def format_duration(value: timedelta | float) -> str:
    """A duration the way ``parse_duration`` reads it: 90 days -> ``90d``, 14 days -> ``2w``."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    left = round(seconds)
    if left <= 0:
        return f"{seconds:g}s"
    days, rest = divmod(left, UNITS["d"])
    parts = []
    if days and not rest and days % 7 == 0:
        return f"{days // 7}w"
    if days:
        parts.append(f"{days}d")
    for unit in ("h", "m", "s"):
        n, rest = divmod(rest, UNITS[unit])
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


def archive_format(path: str | Path, fmt: str | None = None) -> ArchiveFormat:
    """The format of an archive: ``fmt`` if given, else from the name (``.csv`` is CSV,
    anything else JSON lines)."""
    if fmt is None:
        return "csv" if Path(path).suffix.lower() == ".csv" else "jsonl"
    if fmt not in FORMATS:
        raise ValueError(f"bad archive format {fmt!r}: use jsonl or csv")
    return fmt  # type: ignore[return-value]


# -- records ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def plain_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A transaction record (columns, ``stages``, ``events``) as JSON-ready values."""
    out = {k: _plain(v) for k, v in record.items() if k not in ("stages", "events")}
    out["stages"] = [{k: _plain(v) for k, v in s.items()} for s in record.get("stages", ())]
    out["events"] = [{k: _plain(v) for k, v in e.items()} for e in record.get("events", ())]
    return out


def _dumps(value: Any) -> str:
    # No raw line break ever appears in JSON text: strings escape theirs.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _jsonl_line(record: dict[str, Any]) -> bytes:
    return _dumps(record).encode("utf-8")


def _csv_fields(record: dict[str, Any]) -> list[str]:
    fields = []
    extra = {k: v for k, v in record.items() if k not in CSV_COLUMNS}
    for column in CSV_COLUMNS:
        value = extra if column == "extra" else record.get(column)
        if column in _JSON_COLUMNS:
            fields.append(_dumps(value))
        else:
            fields.append("" if value is None else str(value))
    return fields


def _csv_row(fields: list[str]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(fields)
    return buffer.getvalue().encode("utf-8")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _csv_digest(fields: list[str]) -> bytes:
    return _digest("\x1f".join(fields).encode("utf-8"))


# -- reading what a file holds -----------------------------------------------------------------


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """``(offset after the line, line)`` for each line of ``f`` from its start."""
    f.seek(0)
    offset = 0
    for line in f:
        offset += len(line)
        yield offset, line


def _scan_jsonl(f: BinaryIO, name: str) -> tuple[set[bytes], int]:
    """The digests of the complete records, and where the last one ends."""
    digests: set[bytes] = set()
    good = 0
    for number, (offset, line) in enumerate(_lines(f), 1):
        if not line.endswith(b"\n"):
            break  # the torn tail of a crash: never deleted from the database
        body = line[:-1]
        try:
            record = json.loads(body)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "uuid" not in record:
            raise ValueError(f"{name}: line {number} is not a tracking archive record")
        digests.add(_digest(body))
        good = offset
    return digests, good


def _scan_csv(f: BinaryIO, name: str) -> tuple[set[bytes], int]:
    consumed = 0

    def text_lines() -> Iterator[str]:
        nonlocal consumed
        for offset, line in _lines(f):
            if not line.endswith(b"\n"):
                return  # torn tail
            consumed = offset
            yield line.decode("utf-8")

    digests: set[bytes] = set()
    good, short = 0, None
    try:
        for number, row in enumerate(csv.reader(text_lines()), 1):
            if short is not None:
                raise ValueError(f"{name}: row {short} is not a tracking archive record")
            if number == 1:
                if tuple(row) != CSV_COLUMNS:
                    raise ValueError(f"{name}: not a tracking CSV archive (header {row!r})")
            elif len(row) != len(CSV_COLUMNS):
                short = number  # the torn tail if it is the last row, else an error
                continue
            else:
                digests.add(_csv_digest(row))
            good = consumed
    except csv.Error:
        pass  # a record cut short at the end (inside quotes): from ``good`` on, the torn tail
    return digests, good


class Archive:
    """An archive file opened for appending (see the module's docstring).

    Args:
        path: the file (created if missing, with its directory).
        fmt: ``jsonl`` or ``csv`` (default: from the name, see ``archive_format``).

    Raises ``ValueError`` when the file exists and is not an archive of that format, or
    when another purge is writing it.
    """

    def __init__(self, path: str | Path, fmt: str | None = None) -> None:
        self.path = Path(path).expanduser().absolute()
        self.format = archive_format(self.path, fmt)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        created = not self.path.exists()
        try:
            self._file: BinaryIO = open(self.path, "a+b")  # noqa: SIM115 - see close()
        except OSError as exc:
            raise ValueError(f"cannot open the archive {self.path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"{self.path}: another purge is writing this archive") from None
            scan = _scan_csv if self.format == "csv" else _scan_jsonl
            self._digests, good = scan(self._file, str(self.path))
            self._file.seek(0, os.SEEK_END)
            if self._file.tell() != good:  # a torn tail: cut it off, durably
                self._file.truncate(good)
                self._sync()
            if created:
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)  # the file's name survives a machine crash too
                finally:
                    os.close(directory)
            if self.format == "csv" and good == 0:
                self._file.write(_csv_row(list(CSV_COLUMNS)))
                self._sync()
        except BaseException:
            self._file.close()
            raise

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Append these transaction records, durably (flushed and fsynced) before it returns;
        a record the file already holds is skipped. Returns how many were written."""
        chunk: list[bytes] = []
        for record in records:
            plain = plain_record(record)
            if self.format == "csv":
                fields = _csv_fields(plain)
                digest, data = _csv_digest(fields), _csv_row(fields)
            else:
                body = _jsonl_line(plain)
                digest, data = _digest(body), body + b"\n"
            if digest in self._digests:
                continue
            self._digests.add(digest)
            chunk.append(data)
        if chunk:
            self._file.write(b"".join(chunk))
            self._sync()
        return len(chunk)

    def __call__(self, records: list[Mapping[str, Any]]) -> None:
        """The purge's sink: the records of a chunk, durable when it returns."""
        self.write(records)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing releases the lock

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_archive(path: str | Path, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """The records of an archive, as written (JSON values; CSV's empty cells are ``None``)."""
    fmt = archive_format(path, fmt)
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for line in f:
                if line.strip():
                    yield json.loads(line)
            return
        for row in csv.DictReader(f):
            record = {
                column: (json.loads(value) if column in _JSON_COLUMNS
                         else (value if value != "" else None))
                for column, value in row.items()
            }
            extra = record.pop("extra") or {}
            stages, events = record.pop("stages"), record.pop("events")
            yield record | extra | {"stages": stages, "events": events}


__all__ = ["CSV_COLUMNS", "FORMATS", "Archive", "ArchiveFormat", "archive_format",
           "format_duration", "parse_duration", "plain_record", "read_archive"]
