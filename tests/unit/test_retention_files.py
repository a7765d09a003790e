"""Retention without a database: durations, the archive file (formats, torn tails,
duplicates, locks) and ``Process(retention=...)``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tracking import Platform, Process
from tracking.models import TxState
from tracking.retention import (
    CSV_COLUMNS,
    Archive,
    archive_format,
    format_duration,
    parse_duration,
    read_archive,
)


def record(uuid: str, note: str = "x") -> dict:
    at = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    return {"uuid": uuid, "process_code": "P", "business_key": f"key,\n{uuid}",
            "fingerprint": "f", "source": None, "state": TxState.COMPLETED, "created_at": at,
            "updated_at": at, "finished_at": at, "payload": {"note": note}, "priority": 3,
            "stages": [{"id": 1, "uuid": uuid, "state": "COMPLETED"}],
            "events": [{"id": 7, "uuid": uuid, "description": "line 1\nline \"2\""}]}


@pytest.mark.parametrize(("text", "expected"), [
    ("90d", timedelta(days=90)), ("12h", timedelta(hours=12)), ("30m", timedelta(minutes=30)),
    ("2w", timedelta(weeks=2)), ("1d12h", timedelta(hours=36)), (" 45S ", timedelta(seconds=45)),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "90", "d", "90 days", "-1d", "1.5d", "0d", "0h0m",
                                  "99999999999999w", "90y"])
def test_bad_durations_are_refused_naming_the_value(text):
    with pytest.raises(ValueError, match=f"bad duration {text!r}"):
        parse_duration(text)


def test_durations_are_written_the_way_they_are_read():
    for text in ("90d", "2w", "1d12h", "30m", "12h", "45s", "1d1h1m1s"):
        assert format_duration(parse_duration(text)) == text
    assert format_duration(14 * 86_400.0) == "2w"


def test_the_format_comes_from_the_option_or_the_name():
    assert archive_format("a.csv") == "csv" and archive_format("a.CSV") == "csv"
    assert archive_format("a.jsonl") == "jsonl" and archive_format("archive") == "jsonl"
    assert archive_format("a.csv", "jsonl") == "jsonl"
    with pytest.raises(ValueError, match="bad archive format 'xml'"):
        archive_format("a", "xml")


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_records_round_trip_once_each(tmp_path, suffix):
    path = tmp_path / f"a.{suffix}"
    with Archive(path) as archive:
        assert archive.write([record("u1"), record("u2")]) == 2
        assert archive.write([record("u1")]) == 0  # already there
    with Archive(path) as archive:  # reopened: it still knows what the file holds
        assert archive.write([record("u2"), record("u1", note="changed"), record("u3")]) == 2
    records = list(read_archive(path))
    assert [r["uuid"] for r in records] == ["u1", "u2", "u1", "u3"]
    assert records[0]["business_key"] == "key,\nu1"
    assert records[0]["events"][0]["description"] == 'line 1\nline "2"'
    assert records[0]["finished_at"] == "2026-01-05T09:00:00+00:00"
    assert records[0]["state"] == "COMPLETED" and records[0]["source"] is None
    assert records[2]["payload"] == {"note": "changed"}
    assert records[0]["priority"] == 3  # a column CSV_COLUMNS does not name: kept too
    assert list(records[0])[-2:] == ["stages", "events"]


def test_a_torn_csv_row_is_cut_off(tmp_path):
    path = tmp_path / "a.csv"
    with Archive(path) as archive:
        archive.write([record("u1")])
    whole = path.read_bytes()
    with path.open("ab") as f:
        f.write(b'u2,P,"key,\n')  # a crash inside a quoted field
    with Archive(path) as archive:
        assert path.read_bytes() == whole
        archive.write([record("u2")])
    assert [r["uuid"] for r in read_archive(path)] == ["u1", "u2"]
    assert path.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)


def test_a_file_that_is_not_an_archive_is_refused_untouched(tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"uuid": "u1"}\nhello\n')
    with pytest.raises(ValueError, match="line 2 is not a tracking archive record"):
        Archive(notes)
    table = tmp_path / "table.csv"
    table.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a tracking CSV archive"):
        Archive(table)
    assert notes.read_text() == '{"uuid": "u1"}\nhello\n' and table.read_text() == "a,b\n1,2\n"
    with pytest.raises(ValueError, match="cannot open the archive"):
        Archive(tmp_path)


def test_one_purge_at_a_time_writes_an_archive(tmp_path):
    with Archive(tmp_path / "a.jsonl"), pytest.raises(ValueError, match="another purge"):
        Archive(tmp_path / "a.jsonl")
    with Archive(tmp_path / "a.jsonl") as archive:  # released when closed
        assert archive.write([record("u1")]) == 1


def test_a_process_retention_is_a_positive_timedelta():
    platform = Platform("A", order=1)
    assert Process("P", [platform], retention=timedelta(days=90)).describe()[
        "retention_seconds"] == 90 * 86_400
    assert Process("P", [platform]).describe()["retention_seconds"] is None
    for bad in (timedelta(0), 90, "90d"):
        with pytest.raises(ValueError, match="retention must be a timedelta > 0"):
            Process("P", [platform], retention=bad)
