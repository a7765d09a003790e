"""The HTML report: one self-contained page (inline CSS and SVG; no scripts, no network).

It shows the window's totals, a bar chart of stage outcomes per platform, a chart of
transactions finished per hour, the top errors, the oldest waiting items and attempt
durations. Everything comes from ``Reports``; the charts are SVG drawn here.

Example:
    from tracking import Reports, connect
    page = render_html(Reports(connect()), start, end, process="ORDER_CANCELLATION")
    Path("report.html").write_text(page, encoding="utf-8")

or ``tracking report html --out report.html``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from tracking.models import StageState, TxState, utcnow
from tracking.reports import (
    AgingItem,
    ErrorCount,
    HourlyThroughput,
    PlatformStateCount,
    Reports,
    StageDuration,
    StateCount,
)

COLOURS = {
    "PENDING": "#93c5fd",
    "IN_PROGRESS": "#3b82f6",
    "COMPLETED": "#16a34a",
    "REJECTED": "#dc2626",
    "TERMINATED": "#f59e0b",
    "EXHAUSTED": "#9333ea",
    "CANCELLED": "#94a3b8",
}
FINISHED_SERIES = ("completed", "rejected", "exhausted", "cancelled")
MAX_BARS = 14 * 24  # longer windows are charted per day
CHART_WIDTH = 960


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows, read with one query per report."""

    title: str
    process: str | None
    start: datetime
    end: datetime
    generated_at: datetime
    by_state: list[StateCount]
    stages: list[PlatformStateCount]
    throughput: list[HourlyThroughput]
    errors: list[ErrorCount]
    aging: list[AgingItem]
    durations: list[StageDuration]


def collect(
    reports: Reports,
    start: datetime,
    end: datetime,
    process: str | None = None,
    *,
    title: str | None = None,
    now: datetime | None = None,
) -> ReportData:
    """Run the reports the page needs."""
    now = now or utcnow()
    return ReportData(
        title=title or "Tracking report",
        process=process,
        start=start,
        end=end,
        generated_at=now,
        by_state=reports.summary_by_state(start, end, process),
        stages=reports.stage_summary_by_platform(start, end, process),
        throughput=reports.throughput_by_hour(start, end, process),
        errors=reports.top_errors(start, end, process, limit=10),
        aging=reports.aging(process, now=now, limit=15),
        durations=reports.stage_durations(start, end, process),
    )


def render_html(
    reports: Reports,
    start: datetime,
    end: datetime,
    process: str | None = None,
    *,
    title: str | None = None,
    now: datetime | None = None,
) -> str:
    """The report of the window ``[start, end)`` as one HTML page."""
    return page(collect(reports, start, end, process, title=title, now=now))


def page(data: ReportData) -> str:
    """Lay out a ``ReportData`` as HTML."""
    scope = html.escape(data.process or "all processes")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(data.title)}: {scope}</title>
<style>{CSS}</style>
</head>
<body>
<header>
  <h1>{html.escape(data.title)}</h1>
  <p class="sub">{scope} &middot; transactions created {_when(data.start)} to {_when(data.end)}
  UTC &middot; generated {_when(data.generated_at)} UTC</p>
</header>
{_kpis(data.by_state)}
<section>
  <h2>Stage outcomes per platform</h2>
  {platform_chart(data.stages)}
</section>
<section>
  <h2>{_throughput_title(data.throughput)}</h2>
  {throughput_chart(_chart_buckets(data.throughput))}
</section>
<div class="two">
<section>
  <h2>Top errors</h2>
  {_errors_table(data.errors)}
</section>
<section>
  <h2>Attempt durations</h2>
  {_durations_table(data.durations)}
</section>
</div>
<section>
  <h2>Oldest waiting transactions</h2>
  {_aging_table(data.aging)}
</section>
<footer>prefect-tracking &middot; the same numbers are in the SQL views
v_transaction_summary, v_stage_summary, v_error_summary, v_pending_aging</footer>
</body>
</html>
"""


# -- totals ----------------------------------------------------------------------------------


def _kpis(by_state: Sequence[StateCount]) -> str:
    counts = {r.state: r.count for r in by_state}
    total = sum(counts.values())
    finished = sum(counts.get(s, 0) for s in (TxState.COMPLETED, TxState.REJECTED,
                                               TxState.EXHAUSTED, TxState.CANCELLED))
    waiting = sum(counts.get(s, 0) for s in (TxState.PENDING, TxState.IN_PROGRESS,
                                              TxState.TERMINATED))
    rate = f"{100 * counts.get(TxState.COMPLETED, 0) / finished:.0f}%" if finished else "–"
    cards = [
        ("Transactions", total, "#0f172a", "created in the window"),
        ("Completed", counts.get(TxState.COMPLETED, 0), COLOURS["COMPLETED"],
         f"{rate} of finished"),
        ("Rejected", counts.get(TxState.REJECTED, 0), COLOURS["REJECTED"], "business errors"),
        ("Exhausted", counts.get(TxState.EXHAUSTED, 0), COLOURS["EXHAUSTED"],
         "out of attempts"),
        ("Waiting", waiting, COLOURS["IN_PROGRESS"], "pending or retrying"),
        ("Cancelled", counts.get(TxState.CANCELLED, 0), COLOURS["CANCELLED"], "by operators"),
    ]
    items = "".join(
        f'<div class="kpi" style="border-top-color:{colour}"><div class="label">{label}</div>'
        f'<div class="value">{value:,}</div><div class="note">{note}</div></div>'
        for label, value, colour, note in cards
    )
    return f'<div class="kpis">{items}</div>'


# -- charts ------------------------------------------------------------------------------------


def platform_chart(stages: Sequence[PlatformStateCount]) -> str:
    """A horizontal stacked bar per platform: its stages by state."""
    platforms = list(dict.fromkeys(r.platform for r in stages))
    if not platforms:
        return _empty("No transactions were created in this window.")
    states = [s for s in StageState if any(r.state == s for r in stages)]
    counts = {(r.platform, r.state): r.count for r in stages}
    totals = {p: sum(counts.get((p, s), 0) for s in states) for p in platforms}
    left, right, row, bar = 120, 70, 44, 28
    plot = CHART_WIDTH - left - right
    scale = plot / max(totals.values())
    height = len(platforms) * row + 40
    parts = []
    for i, platform in enumerate(platforms):
        y = i * row + 8
        parts.append(_text(left - 12, y + bar / 2 + 5, platform, anchor="end", cls="label"))
        x = float(left)
        for state in states:
            n = counts.get((platform, state), 0)
            if not n:
                continue
            width = n * scale
            parts.append(
                f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{bar}" '
                f'fill="{COLOURS[state.value]}"><title>{html.escape(platform)} '
                f'{state.value}: {n}</title></rect>'
            )
            if width >= 9 * len(str(n)) + 8:
                parts.append(_text(x + width / 2, y + bar / 2 + 5, str(n), anchor="middle",
                                   cls="in-bar"))
            x += width
        parts.append(_text(x + 8, y + bar / 2 + 5, f"{totals[platform]:,}", cls="total"))
    parts.append(_legend([s.value for s in states], left, height - 14))
    return _svg(height, parts, "Stage outcomes per platform")


def throughput_chart(rows: Sequence[tuple[datetime, dict[str, int]]]) -> str:
    """Stacked bars of finished transactions per time bucket (completed at the bottom)."""
    if not rows:
        return _empty("The window is empty.")
    left, right, top, bottom, height = 56, 16, 16, 70, 300
    plot_w, plot_h = CHART_WIDTH - left - right, height - top - bottom
    peak = max(sum(c.values()) for _, c in rows)
    ticks = _nice_ticks(peak)
    scale = plot_h / ticks[-1]
    band = plot_w / len(rows)
    bar = max(band * 0.72, 1.0)
    parts = []
    for tick in ticks:
        y = top + plot_h - tick * scale
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'class="grid"/>')
        parts.append(_text(left - 8, y + 4, f"{tick:,}", anchor="end", cls="axis"))
    daily = len(rows) > 1 and rows[1][0] - rows[0][0] >= timedelta(days=1)
    every = _label_step(len(rows), (1, 2, 7, 14, 28) if daily else (1, 2, 3, 6, 12, 24))
    for i, (when, counts) in enumerate(rows):
        x = left + i * band + (band - bar) / 2
        y = float(top + plot_h)
        for series in FINISHED_SERIES:
            n = counts.get(series, 0)
            if n:
                h = n * scale
                y -= h
                parts.append(
                    f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                    f'fill="{COLOURS[series.upper()]}"><title>{_bucket_label(when, daily)} '
                    f'{series}: {n}</title></rect>'
                )
        if (i if daily else when.hour) % every == 0:
            cx = left + i * band + band / 2
            label = when.strftime("%b %d") if daily else when.strftime("%H:00")
            parts.append(_text(cx, top + plot_h + 18, label, anchor="middle", cls="axis"))
            if not daily and when.hour == 0:
                parts.append(_text(cx, top + plot_h + 34, when.strftime("%b %d"),
                                   anchor="middle", cls="axis"))
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" '
                 f'y2="{top + plot_h}" class="base"/>')
    if peak == 0:
        parts.append(_text(left + plot_w / 2, top + plot_h / 2, "Nothing finished in this window",
                           anchor="middle", cls="muted"))
    parts.append(_legend([s.upper() for s in FINISHED_SERIES], left, height - 12))
    return _svg(height, parts, "Transactions finished over time")


def _chart_buckets(rows: Sequence[HourlyThroughput]) -> list[tuple[datetime, dict[str, int]]]:
    """Hourly rows as chart buckets; summed per UTC day when there are too many hours."""
    buckets: dict[datetime, dict[str, int]] = {}
    per_day = len(rows) > MAX_BARS
    for r in rows:
        key = r.hour.replace(hour=0) if per_day else r.hour
        bucket = buckets.setdefault(key, dict.fromkeys(FINISHED_SERIES, 0))
        for series in FINISHED_SERIES:
            bucket[series] += getattr(r, series)
    return list(buckets.items())


def _throughput_title(rows: Sequence[HourlyThroughput]) -> str:
    unit = "day" if len(rows) > MAX_BARS else "hour"
    total = sum(r.completed for r in rows)
    return f"Transactions finished per {unit} (UTC) &middot; {total:,} completed"


def _bucket_label(when: datetime, daily: bool) -> str:
    return when.strftime("%Y-%m-%d") if daily else when.strftime("%Y-%m-%d %H:00")


def _label_step(buckets: int, steps: Sequence[int], most: int = 12) -> int:
    """The first of ``steps`` that labels at most ``most`` buckets."""
    return next((s for s in steps if buckets / s <= most), steps[-1] * 2)


def _nice_ticks(peak: int) -> list[int]:
    """Round axis values from 0 to at least ``peak`` (at most 6 ticks)."""
    if peak <= 0:
        return [0, 1]
    raw = peak / 5
    magnitude = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    step = max(int(step), 1)
    return list(range(0, (math.ceil(peak / step) + 1) * step, step))


def _legend(names: Iterable[str], x: float, y: float) -> str:
    parts = []
    for name in names:
        parts.append(f'<rect x="{x:.0f}" y="{y - 10:.0f}" width="12" height="12" rx="2" '
                     f'fill="{COLOURS[name]}"/>')
        label = name.replace("_", " ").capitalize()
        parts.append(_text(x + 18, y, label, cls="legend"))
        x += 30 + 8 * len(label)
    return "".join(parts)


def _text(x: float, y: float, text: str, *, anchor: str = "start", cls: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" class="{cls}">'
            f'{html.escape(text)}</text>')


def _svg(height: int, parts: Sequence[str], label: str) -> str:
    return (f'<svg viewBox="0 0 {CHART_WIDTH} {height}" role="img" '
            f'aria-label="{html.escape(label)}">'
            + "".join(parts) + "</svg>")


def _empty(message: str) -> str:
    return f'<p class="muted">{html.escape(message)}</p>'


# -- tables ------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> str:
    if not rows:
        return _empty(empty)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f'<td class="num">{value:,}</td>'
    if isinstance(value, datetime):
        return f'<td class="time">{_when(value)}</td>'
    text = "" if value is None else str(getattr(value, "value", value))
    if text in COLOURS:
        return f'<td><span class="pill" style="background:{COLOURS[text]}">{text}</span></td>'
    return f"<td>{html.escape(text)}</td>"


def _errors_table(errors: Sequence[ErrorCount]) -> str:
    return _table(
        ["Platform", "Code", "Count", "Description", "Last seen"],
        [[e.platform, e.error_code, e.count, e.description or "", e.last_seen]
         for e in errors],
        "No errors in this window.",
    )


def _durations_table(durations: Sequence[StageDuration]) -> str:
    return _table(
        ["Platform", "Attempts", "Mean (s)", "p95 (s)", "Max (s)"],
        [[d.platform, d.attempts, d.mean_seconds, d.p95_seconds, d.max_seconds]
         for d in durations],
        "No attempts in this window.",
    )


def _aging_table(items: Sequence[AgingItem]) -> str:
    return _table(
        ["Business key", "Waiting at", "State", "Tries", "Last error", "Created", "Waiting for"],
        [[i.business_key, f"{i.platform}.{i.stage}", i.state, i.attempts,
          f"{i.error_code}: {i.error_description or ''}" if i.error_code else "",
          i.created_at, _duration(i.age_seconds)] for i in items],
        "Nothing is waiting.",
    )


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60:02d} min" if hours < 48 else f"{hours // 24} days"


CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1040px; padding: 28px 32px 40px; background: #f1f5f9;
  color: #0f172a; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, sans-serif; }
header h1 { margin: 0; font-size: 26px; letter-spacing: -0.01em; }
.sub { margin: 4px 0 20px; color: #475569; }
h2 { margin: 0 0 12px; font-size: 16px; }
section { background: #fff; border-radius: 10px; padding: 18px 20px; margin-bottom: 18px;
  box-shadow: 0 1px 2px rgba(15, 23, 42, .08); }
.kpis { display: grid; grid-template-columns: repeat(6, 1fr); gap: 12px; margin-bottom: 18px; }
.kpi { background: #fff; border-radius: 10px; padding: 12px 14px; border-top: 4px solid;
  box-shadow: 0 1px 2px rgba(15, 23, 42, .08); }
.kpi .label { color: #475569; font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.kpi .value { font-size: 28px; font-weight: 650; margin: 2px 0; }
.kpi .note { color: #64748b; font-size: 12px; }
.two { display: grid; grid-template-columns: 3fr 2fr; gap: 18px; }
.two section { margin-bottom: 18px; }
svg { width: 100%; height: auto; display: block; }
svg text { font-size: 13px; fill: #0f172a; }
svg .label { font-weight: 600; }
svg .in-bar { fill: #fff; font-size: 12px; font-weight: 600; }
svg .total { fill: #334155; font-weight: 600; }
svg .axis, svg .legend { fill: #475569; font-size: 12px; }
svg .muted { fill: #94a3b8; font-size: 15px; }
svg .grid { stroke: #e2e8f0; stroke-width: 1; }
svg .base { stroke: #94a3b8; stroke-width: 1; }
table { width: 100%; border-collapse: collapse; font-size: 13px; }
th { text-align: left; color: #475569; font-weight: 600; border-bottom: 2px solid #e2e8f0;
  padding: 6px 8px; }
td { border-bottom: 1px solid #f1f5f9; padding: 6px 8px; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.time { white-space: nowrap; color: #475569; }
th { white-space: nowrap; }
.pill { color: #fff; border-radius: 999px; padding: 1px 8px; font-size: 11px;
  font-weight: 600; }
.muted { color: #94a3b8; }
footer { color: #94a3b8; font-size: 12px; text-align: center; margin-top: 8px; }
@media (max-width: 800px) { .kpis { grid-template-columns: repeat(3, 1fr); }
  .two { grid-template-columns: 1fr; } }
"""
