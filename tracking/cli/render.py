"""Output of the command line: consoles, rich tables (pivots with totals), report rows as
csv/json/table, and the small formatting helpers (ages, spans, counts, retry policies)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tracking.app import ActionResult
from tracking.reports import as_dicts, to_csv

SHOWN_ROWS = 50

STATE_STYLES = {
    "PENDING": "blue",
    "IN_PROGRESS": "cyan",
    "COMPLETED": "green",
    "REJECTED": "red",
    "TERMINATED": "yellow",
    "EXHAUSTED": "magenta",
    "CANCELLED": "bright_black",
    "SUCCESS": "green",
    "BUSINESS_ERROR": "red",
    "SYSTEM_ERROR": "yellow",
}


def console(file: Any) -> Console:
    """A console on ``file``; wide enough for uuids in tables when it is a file or a pipe."""
    width = None if getattr(file, "isatty", lambda: False)() else 160
    return Console(file=file, highlight=False, width=width, soft_wrap=file is sys.stderr)


def write(text: str) -> None:
    """Machine-readable output (csv, json) goes to stdout as is, never through rich."""
    sys.stdout.write(text)


def write_json(data: Any, *, indent: int | None = 2) -> None:
    write(json.dumps(data, indent=indent, default=str) + "\n")


def plain_text(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(getattr(value, "value", value))


def styled(value: Any) -> Text:
    text = "" if value is None else plain_text(value)
    return Text(text, style=STATE_STYLES.get(text, ""))


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Group:
    """A bold title line over a rich table; numeric columns right-aligned; states coloured."""
    rows = [list(r) for r in rows]
    if not rows:
        return Group(Text(title, style="bold"), Text("(none)", style="dim"))
    grid = Table(header_style="bold")
    for i, header in enumerate(headers):
        numeric = all(isinstance(r[i], int | float) for r in rows)
        uuid = header == "uuid"  # never folded: operators copy them
        grid.add_column(header, justify="right" if numeric else "left", overflow="fold",
                        no_wrap=uuid, min_width=36 if uuid else None)
    for row in rows:
        grid.add_row(*(styled(v) for v in row))
    return Group(Text(title, style="bold"), grid)


def pivot(
    title: str, keys: list[tuple[str, ...]], key_headers: Sequence[str],
    counts: dict[tuple[tuple[str, ...], str], int], states: Sequence[str],
) -> Group:
    """Rows per key, a column per state, with row and column totals."""
    rows = []
    for key in keys:
        values = [counts.get((key, s), 0) for s in states]
        rows.append([*key, *values, sum(values)])
    totals = [sum(counts.get((k, s), 0) for k in keys) for s in states]
    group = table(title, [*key_headers, *states, "Total"], rows)
    grid = group.renderables[-1]
    if len(keys) > 1:
        grid.add_section()
        grid.add_row(
            *[Text("Total", style="bold")] + [Text("")] * (len(key_headers) - 1),
            *(Text(str(n), style="bold") for n in [*totals, sum(totals)]),
        )
    return group


def emit(
    out: Console, rows: Sequence[Any], fmt: str, row_type: type, as_table: Callable[[], Group]
) -> None:
    """Print report rows as csv, json, or (``table``) what ``as_table`` builds."""
    if fmt == "csv":
        write(to_csv(rows, [f.name for f in fields(row_type)]))
    elif fmt == "json":
        write_json(as_dicts(rows))
    else:
        out.print(as_table())


def action_results(out: Console, err: Console, results: Sequence[ActionResult], verb: str
                   ) -> bool:
    """One ✓/✗ line per transaction an operator action touched; ``False`` if any failed."""
    failed = 0
    for result in results:
        if result.error is not None or result.tx is None:
            failed += 1
            err.print(f"[red]✗[/] {escape(result.uuid)}: {escape(str(result.error))}",
                      soft_wrap=True)
        else:
            out.print(f"[green]✓[/] {escape(result.uuid)}: {verb}, now {result.tx.state.value}",
                      soft_wrap=True)
    if failed:
        err.print(f"{failed} of {len(results)} could not be {verb}")
    return not failed


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def span(start: datetime, end: datetime) -> str:
    return f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"


def age(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def retry_text(retry: dict[str, Any]) -> str:
    """A retry policy (``RetryPolicy.describe()``) in words."""
    attempts = retry.get("max_attempts")
    parts = [f"{attempts} attempts" if attempts is not None else "unlimited attempts"]
    if retry.get("delay"):
        parts.append(f"delay {retry['delay']:g}s")
    if retry.get("backoff", 1) != 1:
        parts.append(f"backoff x{retry['backoff']:g}")
    if retry.get("max_delay") is not None:
        parts.append(f"max delay {retry['max_delay']:g}s")
    if retry.get("jitter"):
        parts.append(f"jitter {retry['jitter']:g}s")
    return ", ".join(parts)
