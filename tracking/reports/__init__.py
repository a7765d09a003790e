"""SQL reports on the tracking store: ``Reports`` (the queries), their rows, the window rule,
and exports (dicts, CSV, markdown).

Example:
    reports = Reports(engine)
    start, end = report_window(None, None, now=utcnow())       # the last 7 days
    for row in reports.summary_by_state(start, end, process="CANCELLATION"):
        print(row.state, row.count)
"""

from tracking.reports.export import as_dicts, summary_markdown, to_csv
from tracking.reports.queries import Reports
from tracking.reports.rows import (
    AgingItem,
    AttemptCount,
    ErrorCount,
    HourlyThroughput,
    OverdueItem,
    PlatformStageStateCount,
    PlatformStateCount,
    ProcessStateCount,
    RequeueCandidate,
    SlaDay,
    StageDuration,
    StateCount,
)
from tracking.reports.window import DEFAULT_REPORT_WINDOW, report_window

__all__ = [
    "DEFAULT_REPORT_WINDOW",
    "Reports",
    "StateCount",
    "ProcessStateCount",
    "PlatformStateCount",
    "PlatformStageStateCount",
    "ErrorCount",
    "AgingItem",
    "AttemptCount",
    "HourlyThroughput",
    "StageDuration",
    "RequeueCandidate",
    "OverdueItem",
    "SlaDay",
    "as_dicts",
    "report_window",
    "summary_markdown",
    "to_csv",
]
