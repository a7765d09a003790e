"""Report rows out: plain dicts, CSV, and the markdown summary of the resume artifacts."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields, is_dataclass
from datetime import UTC, date, datetime
from typing import Any

from tracking.models import (
    StageState,
)
from tracking.reports.queries import Reports
from tracking.reports.rows import PlatformStateCount


def as_dicts(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """Report rows (dataclasses or SQLModel objects) as plain dicts of JSON-friendly values."""
    out = []
    for row in rows:
        data = asdict(row) if is_dataclass(row) else row.model_dump()
        out.append({k: _plain(v) for k, v in data.items()})
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if hasattr(value, "value") and isinstance(value, str):
        return value.value
    return value


def to_csv(rows: Sequence[Any], columns: Sequence[str] | None = None) -> str:
    """Report rows as CSV text with a header line."""
    dicts = as_dicts(rows)
    if columns is None:
        if dicts:
            columns = list(dicts[0])
        elif rows and is_dataclass(rows[0]):
            columns = [f.name for f in fields(rows[0])]
        else:
            columns = []
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for d in dicts:
        writer.writerow(
            {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in d.items()}
        )
    return buf.getvalue()


def summary_markdown(
    reports: Reports, start: datetime, end: datetime, process: str | None = None
) -> str:
    """A markdown summary of the window: totals by state, stages per platform, top errors.

    The runner publishes it as a Prefect markdown artifact after each run.

    Example:
        from prefect.artifacts import create_markdown_artifact
        create_markdown_artifact(summary_markdown(Reports(engine), start, end, "CANCELLATION"))
    """
    by_state = reports.summary_by_state(start, end, process)
    stages = reports.stage_summary_by_platform(start, end, process)
    errors = reports.top_errors(start, end, process)
    total = sum(r.count for r in by_state)
    title = f"Tracking summary: {process or 'all processes'}"
    lines = [
        f"# {title}",
        "",
        f"Transactions created from {_md_time(start)} to {_md_time(end)} (UTC): **{total}**",
        "",
        "## Transactions by state",
        "",
        *_md_table(["State", "Transactions"], [[r.state.value, r.count] for r in by_state]),
        "",
        "## Stages per platform",
        "",
        *_md_platform_table(stages),
        "",
        "## Top errors",
        "",
        *_md_table(
            ["Process", "Platform", "Outcome", "Code", "Count", "Last seen", "Description"],
            [
                [e.process, e.platform, e.outcome.value, e.error_code, e.count,
                 _md_time(e.last_seen), e.description or ""]
                for e in errors
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def _md_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _md_cell(value: Any) -> str:
    text = " ".join(str(value).split())  # one line
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    if not rows:
        return ["_none_"]
    align = ["---:" if isinstance(v, int | float) else "---" for v in rows[0]]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(align) + " |",
        *("| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows),
    ]


def _md_platform_table(stages: Sequence[PlatformStateCount]) -> list[str]:
    platforms = list(dict.fromkeys(r.platform for r in stages))
    states = [s for s in StageState if any(r.state == s for r in stages)]
    counts = {(r.platform, r.state): r.count for r in stages}
    rows = [
        [p, *(counts.get((p, s), 0) for s in states), sum(counts.get((p, s), 0) for s in states)]
        for p in platforms
    ]
    return _md_table(["Platform", *(s.value for s in states), "Total"], rows)
