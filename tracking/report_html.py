"""The HTML report: one self-contained page (inline CSS and SVG; no scripts, no network).

It shows the window's totals, a bar chart of stage outcomes per platform, a chart of
transactions finished per hour, the top errors, the oldest waiting items and attempt
durations. Everything comes from ``Reports``. The page is the Jinja2 template
``tracking/templates/report.html.j2`` (autoescaped, with its tables in ``tables.html.j2`` and
its CSS in ``report.css``); the SVG charts are drawn here, their text escaped, and passed to
it as ``Markup``.

Example:
    from tracking import Reports, connect
    page = render_html(Reports(connect("sqlite:///tracking.db")), start, end, process="P")
    Path("report.html").write_text(page, encoding="utf-8")

or ``tracking report html --out report.html``.
"""

from __future__ import annotations

import functools
import html
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jinja2
from markupsafe import Markup

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
from tracking.states import WAITING_TX_STATES

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
class Link:
    """A table cell that links somewhere: ``text`` (escaped) pointing at ``href``."""

    text: Any
    href: str


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
    """Lay out a ``ReportData`` as HTML (the template ``templates/report.html.j2``)."""
    return template("report.html.j2").render(**context(data))


def context(
    data: ReportData, *, link_transaction: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """What ``report.html.j2`` (and the templates extending it) show of ``data``.

    ``link_transaction(uuid)``, when given, is the address of a transaction's page: the
    business keys of the waiting items then link to it (the live dashboard does so).
    """
    def key(item: AgingItem) -> Any:
        if link_transaction is None:
            return item.business_key
        return Link(item.business_key, link_transaction(item.uuid))

    return dict(
        title=data.title,
        scope=data.process or "all processes",
        start=data.start,
        end=data.end,
        generated_at=data.generated_at,
        kpis=_kpis(data.by_state),
        platform_chart=platform_chart(data.stages),
        throughput_unit="day" if len(data.throughput) > MAX_BARS else "hour",
        completed=sum(r.completed for r in data.throughput),
        throughput_chart=throughput_chart(_chart_buckets(data.throughput)),
        errors=_rows([e.platform, e.error_code, e.count, e.description, e.last_seen]
                     for e in data.errors),
        durations=_rows([d.platform, d.attempts, d.mean_seconds, d.p95_seconds, d.max_seconds]
                        for d in data.durations),
        aging=_rows([key(i), f"{i.platform}.{i.stage}", i.state, i.attempts,
                     f"{i.error_code}: {i.error_description or ''}" if i.error_code else "",
                     i.created_at, _duration(i.age_seconds)] for i in data.aging),
    )


def _escape(value: Any) -> Markup:
    """What every ``{{ ... }}`` prints: ``html.escape`` of it, unless it is ``Markup``.

    Autoescape would escape it anyway; this keeps the entities ``html.escape`` writes
    (``&quot;``, ``&#x27;``) where markupsafe writes ``&#34;``, ``&#39;``.
    """
    return value if isinstance(value, Markup) else Markup(html.escape(str(value)))


@functools.cache
def environment() -> jinja2.Environment:
    """The templates of ``tracking/templates``: autoescaped, strict, with the report's filters
    (``num``, ``when``), tests (``datetime``, ``link``) and colours."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tracking", "templates"),
        autoescape=True,
        finalize=_escape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = lambda value: f"{value:,}"
    env.filters["when"] = _when
    env.tests["datetime"] = lambda value: isinstance(value, datetime)
    env.tests["link"] = lambda value: isinstance(value, Link)
    env.globals["colours"] = COLOURS
    return env


def template(name: str) -> jinja2.Template:
    return environment().get_template(name)


# -- totals ----------------------------------------------------------------------------------


def _kpis(by_state: Sequence[StateCount]) -> list[dict[str, Any]]:
    counts = {r.state: r.count for r in by_state}
    total = sum(counts.values())
    finished = sum(counts.get(s, 0) for s in (TxState.COMPLETED, TxState.REJECTED,
                                               TxState.EXHAUSTED, TxState.CANCELLED))
    waiting = sum(counts.get(s, 0) for s in WAITING_TX_STATES)
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
    return [dict(label=label, value=value, colour=colour, note=note)
            for label, value, colour, note in cards]


# -- charts ------------------------------------------------------------------------------------


def platform_chart(stages: Sequence[PlatformStateCount]) -> Markup:
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


def throughput_chart(rows: Sequence[tuple[datetime, dict[str, int]]]) -> Markup:
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


def _svg(height: int, parts: Sequence[str], label: str) -> Markup:
    """The chart; its text was escaped by ``_text`` and ``html.escape``, so it is Markup."""
    return Markup(f'<svg viewBox="0 0 {CHART_WIDTH} {height}" role="img" '
                  f'aria-label="{html.escape(label)}">' + "".join(parts) + "</svg>")


def _empty(message: str) -> Markup:
    return Markup(f'<p class="muted">{html.escape(message)}</p>')


# -- tables ------------------------------------------------------------------------------------


def _rows(rows: Iterable[Sequence[Any]]) -> list[list[Any]]:
    """Table rows for the template: enums as their value, None as an empty cell."""
    return [["" if v is None else getattr(v, "value", v) for v in row] for row in rows]


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h {minutes % 60:02d} min" if hours < 48 else f"{hours // 24} days"

