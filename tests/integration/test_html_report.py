"""The HTML report: self-contained, correct content, and a real browser renders it (not blank)."""

from __future__ import annotations

import struct
import zlib
from datetime import timedelta

import pytest

from tests.conftest import FakeClock
from tests.integration.test_queries import count_statements
from tests.sample_processes import build_scenario, process
from tools.report_screenshot import (
    check_not_blank,
    find_chromium,
    png_pixels,
    sample_html,
    screenshot,
)
from tracking import ExecutionResult, Reports, Tracker
from tracking.report_html import collect, page, render_html


@pytest.fixture
def scenario(engine):
    clock = FakeClock()
    start = clock.now
    build_scenario(Tracker(engine, [process], clock=clock), clock, hours=6)
    return Reports(engine), start, start + timedelta(hours=6), clock


def assert_self_contained(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>")
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert "<svg" in html


def test_report_shows_totals_charts_errors_and_aging(scenario):
    reports, start, end, clock = scenario
    html = render_html(reports, start, end, title="Daily report", now=clock.now)
    assert_self_contained(html)
    assert html.count("<svg") == 2
    assert "<h1>Daily report</h1>" in html
    total = sum(r.count for r in reports.summary_by_state(start, end))
    assert f'<div class="value">{total:,}</div>' in html
    for platform in ("A", "B", "C"):
        assert f">{platform}</text>" in html  # a bar per platform
    for error in reports.top_errors(start, end):
        assert error.description in html
    waiting = reports.aging(now=clock.now)
    assert waiting and all(item.business_key in html for item in waiting)
    assert "Transactions finished per hour" in html
    assert html.count('<rect x=') > 20  # bars


def test_report_reads_each_report_once(scenario):
    reports, start, end, clock = scenario
    with count_statements(reports.engine) as seen:
        collect(reports, start, end, now=clock.now)
    assert len(seen) == 6  # one statement per report, whatever the number of rows


def test_report_of_an_empty_window(engine):
    reports = Reports(engine)
    clock = FakeClock()
    html = render_html(reports, clock.now - timedelta(days=1), clock.now, "CANCELLATION")
    assert_self_contained(html)
    assert "No transactions were created in this window." in html
    assert "Nothing finished in this window" in html
    assert "No errors in this window." in html and "Nothing is waiting." in html


def test_long_windows_are_charted_per_day(scenario):
    reports, start, end, clock = scenario
    data = collect(reports, end - timedelta(days=30), end, now=clock.now)
    html = page(data)
    assert "Transactions finished per day" in html
    assert "<title>2026-01-05 completed:" in html  # one bar per day
    assert "<title>2026-01-05 09:00 completed:" not in html


def test_text_from_the_database_is_escaped(engine):
    clock = FakeClock()
    tracker = Tracker(engine, [process], clock=clock)
    uuid, _ = tracker.start_or_resume("CANCELLATION", {"request_id": "<b>x</b>"})
    tracker.complete_stage(uuid, "A", ExecutionResult(4, '<script src="https://x">'))
    html = render_html(Reports(engine), clock.now - timedelta(hours=1),
                       clock.now + timedelta(hours=1), title="<i>T</i>")
    assert "&lt;script src=&quot;https://x&quot;&gt;" in html
    assert "<script" not in html and "<i>T</i>" not in html and "&lt;i&gt;T&lt;/i&gt;" in html


def test_business_keys_and_errors_of_waiting_items_are_escaped(engine):
    """The aging table shows the business key and the last error: both escaped, never markup."""
    clock = FakeClock()
    tracker = Tracker(engine, [process], clock=clock)
    uuid, _ = tracker.start_or_resume("CANCELLATION", {"request_id": "<b>K&1</b>'\""})
    tracker.complete_stage(uuid, "A", ExecutionResult(0))
    tracker.complete_stage(uuid, "B", ExecutionResult(-2, '<img src=x onerror="a&b">'),
                           stage="process")
    start, end = clock.now - timedelta(hours=1), clock.now + timedelta(hours=1)
    html = render_html(Reports(engine), start, end, now=clock.now)
    assert "<td>&lt;b&gt;K&amp;1&lt;/b&gt;&#x27;&quot;</td>" in html  # business key (aging)
    assert "-2: &lt;img src=x onerror=&quot;a&amp;b&quot;&gt;" in html  # its last error
    assert "&lt;img src=x onerror=&quot;a&amp;b&quot;&gt;</td>" in html  # top errors
    assert "<b>" not in html and "<img" not in html
    filtered = render_html(Reports(engine), start, end, "<p>", now=clock.now)
    assert "&lt;p&gt; &middot; transactions created" in filtered  # the process filter
    assert "<p>" not in filtered


# -- the PNG check itself ------------------------------------------------------------------------


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def encode_png(rows: list[bytes], width: int, bpp: int = 3) -> bytes:
    """A PNG using each of the five row filters in turn (to test the decoder)."""
    raw, prev = b"", bytes(width * bpp)
    for y, row in enumerate(rows):
        kind = y % 5
        out = bytearray()
        for i, value in enumerate(row):
            left = row[i - bpp] if i >= bpp else 0
            up_left = prev[i - bpp] if i >= bpp else 0
            predictor = [0, left, prev[i], (left + prev[i]) >> 1,
                         _paeth(left, prev[i], up_left)][kind]
            out.append((value - predictor) & 0xFF)
        raw += bytes([kind]) + bytes(out)
        prev = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, len(rows), 8, 2 if bpp == 3 else 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_png_decoder_handles_every_row_filter():
    width = 7
    rows = [bytes((x * 37 + y * 11 + c * 5) % 256 for x in range(width) for c in range(3))
            for y in range(10)]
    assert png_pixels(encode_png(rows, width)) == (width, 3, rows)


def test_a_blank_screenshot_fails_the_check(tmp_path):
    blank = tmp_path / "blank.png"
    blank.write_bytes(encode_png([bytes([255] * 30)] * 10, 10))
    with pytest.raises(AssertionError, match="looks blank"):
        check_not_blank(blank)


# -- in a real browser -----------------------------------------------------------------------


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (CI installs it)")
def test_chromium_renders_the_report(tmp_path):
    html_file = tmp_path / "report.html"
    html_file.write_text(sample_html(f"sqlite:///{tmp_path}/sample.db", hours=12))
    png_file = tmp_path / "report.png"
    screenshot(html_file, png_file, size="1200,900")
    found = check_not_blank(png_file)
    assert found["COMPLETED"] > 1000 and found["REJECTED"] > 50
