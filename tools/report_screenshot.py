"""Render the HTML report of the sample scenario and screenshot it with headless Chromium.

A tool, run from the checkout by ``make screenshot``, and used by
``tests/integration/test_html_report.py``::

    python -m tools.report_screenshot build/report-sample.html build/report-sample.png

The scenario is the tests' (``tests/sample_processes.py``, with their ``FakeClock``), so it
needs the checkout and the dev extras, as the tests do.

The screenshot is checked without new dependencies: the PNG is decoded here (zlib and the
five PNG row filters) and must show many colours, including the report's chart colours.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path

from tests.conftest import FakeClock
from tests.sample_processes import build_scenario, process
from tracking import Reports, Tracker, connect
from tracking.report_html import COLOURS, render_html

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def sample_html(database_url: str, hours: int = 24) -> str:
    """Build the sample scenario in ``database_url`` and render its report."""
    engine = connect(database_url, migrate=True)
    try:
        clock = FakeClock()
        start = clock.now
        build_scenario(Tracker(engine, [process], clock=clock), clock, hours=hours)
        end = start + timedelta(hours=hours)
        return render_html(Reports(engine), start, end, title="Sample tracking report",
                           now=clock.now + timedelta(minutes=30))
    finally:
        engine.dispose()


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def screenshot(html_file: Path, png_file: Path, size: str = "1200,900") -> None:
    """Screenshot ``html_file`` with headless Chromium (no network, throwaway profile)."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--screenshot={png_file}", f"--window-size={size}",
             html_file.resolve().as_uri()],
            check=True, capture_output=True, timeout=120,
        )


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA PNG: ``(width, bytes per pixel, rows of pixel bytes)``."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    if header is None:
        raise ValueError("PNG without IHDR")
    width, height, depth, colour_type, _, _, interlace = header
    if depth != 8 or colour_type not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour_type})")
    bpp = 4 if colour_type == 6 else 3
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, previous = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous,
                        bpp)
        rows.append(bytes(row))
        previous = row
    return width, bpp, rows


def _unfilter(kind: int, row: bytearray, prev: bytes, bpp: int) -> bytearray:
    if kind == 1:  # Sub
        for i in range(bpp, len(row)):
            row[i] = (row[i] + row[i - bpp]) & 0xFF
    elif kind == 2:  # Up
        row = bytearray((a + b) & 0xFF for a, b in zip(row, prev, strict=True))
    elif kind == 3:  # Average
        for i in range(len(row)):
            left = row[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xFF
    elif kind == 4:  # Paeth
        for i in range(len(row)):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            row[i] = (row[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    return row


def colour_counts(png_file: Path) -> Counter[tuple[int, int, int]]:
    """How many pixels of each RGB colour the screenshot has."""
    width, bpp, rows = png_pixels(png_file.read_bytes())
    counts: Counter[tuple[int, int, int]] = Counter()
    for row in rows:
        for x in range(0, width * bpp, bpp):
            counts[(row[x], row[x + 1], row[x + 2])] += 1
    return counts


def check_not_blank(png_file: Path) -> dict[str, int]:
    """Raise ``AssertionError`` unless the screenshot shows the report's charts.

    Returns the number of pixels of each chart colour found.
    """
    counts = colour_counts(png_file)
    if len(counts) < 20:
        raise AssertionError(f"{png_file} looks blank: only {len(counts)} distinct colours")
    found = {}
    for state in ("COMPLETED", "REJECTED", "PENDING"):
        rgb = tuple(int(COLOURS[state][i : i + 2], 16) for i in (1, 3, 5))
        found[state] = counts.get(rgb, 0)  # type: ignore[call-overload]
    if found["COMPLETED"] < 500:
        raise AssertionError(f"{png_file}: the charts are missing (colour pixels: {found})")
    return found


def main(argv: list[str]) -> int:
    html_file = Path(argv[0] if argv else "build/report-sample.html")
    png_file = Path(argv[1] if len(argv) > 1 else html_file.with_suffix(".png"))
    html_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        html_file.write_text(sample_html(f"sqlite:///{tmp}/sample.db"), encoding="utf-8")
    screenshot(html_file, png_file, size="1200,1600")
    found = check_not_blank(png_file)
    print(f"wrote {html_file} and {png_file}; chart pixels: {found}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
