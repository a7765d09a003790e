"""The ``/reports/*`` endpoints and their response models: the ``Reports`` of a window (or,
for ``overdue``, of now) as JSON or CSV.

Each report is one SQL query (the same ``Reports`` methods as the CLI), run in a worker
thread and shared by identical concurrent requests (the coalescer). The window is
``tracking.reports.report_window``'s; ``create_app`` puts these routes under the reads' API
key rule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from tracking.api.routes import ProcessFilter, Service, _errors
from tracking.api.schemas import to_utc
from tracking.api.service import ApiService
from tracking.models import StageState, TxState
from tracking.outcomes import Outcome
from tracking.reports import as_dicts, to_csv

report_router = APIRouter()

From = Annotated[
    datetime | None,
    Query(alias="from", description="ISO 8601 (naive: UTC); default: 7 days before `to`."),
]
To = Annotated[
    datetime | None,
    Query(alias="to", description="ISO 8601 (naive: UTC), exclusive; default: now (inclusive)."),
]
Format = Annotated[
    Literal["json", "csv"] | None,
    Query(description="csv for CSV (or send Accept: text/csv)."),
]
CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {"schema": {"type": "string"}}}}
}


def _wants_csv(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "csv"
    return "text/csv" in request.headers.get("accept", "")


def _csv(text: str, name: str) -> Response:
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


# -- response models --------------------------------------------------------------------


class Window(BaseModel):
    start: datetime = Field(description="Inclusive.")
    end: datetime = Field(description="Exclusive.")


class ProcessSummary(BaseModel):
    process: str
    total: int
    by_state: dict[str, int]


class SummaryReport(BaseModel):
    window: Window
    process: str | None
    state: TxState | None
    total: int
    by_state: dict[str, int]
    by_process: list[ProcessSummary]


class PlatformStateCountOut(BaseModel):
    platform: str
    state: StageState
    count: int


class StageStateCountOut(BaseModel):
    platform: str
    stage: str
    state: StageState
    count: int


class StageReport(BaseModel):
    window: Window
    process: str | None
    by_platform: list[PlatformStateCountOut]
    by_stage: list[StageStateCountOut]


class ErrorCountOut(BaseModel):
    process: str
    platform: str
    outcome: Outcome
    error_code: int
    count: int
    last_seen: datetime
    description: str | None


class ErrorReport(BaseModel):
    window: Window
    process: str | None
    errors: list[ErrorCountOut]


class OverdueItemOut(BaseModel):
    uuid: str
    process: str
    business_key: str
    state: TxState
    priority: int
    deadline: datetime | None
    due_at: datetime = Field(description="The earlier of its deadline and created_at + SLA.")
    platform: str = Field(description="Where it waits (its first stage not COMPLETED).")
    stage: str
    stage_state: StageState
    attempts: int
    next_attempt_at: datetime | None
    error_code: int | None
    error_description: str | None
    created_at: datetime
    overdue_seconds: float


class OverdueReport(BaseModel):
    now: datetime
    process: str | None
    items: list[OverdueItemOut]


class SlaCounts(BaseModel):
    transactions: int = Field(description="Created with a due time (an SLA or a deadline).")
    finished: int = Field(description="Of them, in a final state.")
    within_sla: int = Field(description="Finished by their due time.")
    late: int = Field(description="Finished after it.")
    open: int = Field(description="Still waiting.")
    overdue: int = Field(description="Still waiting, past their due time.")
    attainment: float | None = Field(description="within_sla / finished (null: none finished).")


class SlaDayOut(SlaCounts):
    process: str
    day: date = Field(description="UTC day the transactions were created.")
    sla_seconds: float | None


class SlaProcessOut(SlaCounts):
    process: str
    sla_seconds: float | None


class SlaReport(BaseModel):
    window: Window
    process: str | None
    by_process: list[SlaProcessOut]
    by_day: list[SlaDayOut]


# -- endpoints ------------------------------------------------------------------------------


async def _report(
    service: ApiService,
    name: str,
    start: datetime | None,
    end: datetime | None,
    query: Callable[[datetime, datetime], list[Any]],
    *key: Any,
) -> tuple[Window, list[Any]]:
    """Run a report query over the window, shared with identical concurrent requests.

    The window's defaults (``to`` = now) are resolved when the query starts, so a shared
    result is never older than the request.
    """
    start, end = to_utc(start, "from"), to_utc(end, "to")
    service.window(start, end)  # validate now, before joining anything

    def run() -> tuple[Window, list[Any]]:
        s, e = service.window(start, end)
        return Window(start=s, end=e), query(s, e)

    return await service.coalescer.run((name, start, end, *key), run)


@report_router.get(
    "/reports/summary",
    response_model=SummaryReport,
    responses={**CSV_RESPONSE, **_errors(401, 422)},
    summary="Transactions counted by state and by process",
)
async def summary_report(
    request: Request,
    service: Service,
    process: ProcessFilter = None,
    state: Annotated[TxState | None, Query()] = None,
    start: From = None,
    end: To = None,
    format: Format = None,
) -> Any:
    """Transactions created in `[from, to)`, counted by state and by process (one query)."""
    service.check_process(process)
    window, rows = await _report(
        service, "summary", start, end,
        lambda s, e: service.reports.summary_by_process_and_state(s, e, process), process,
    )
    if state is not None:
        rows = [r for r in rows if r.state == state]
    if _wants_csv(request, format):
        return _csv(to_csv(rows, ["process", "state", "count"]), "summary")
    by_state = {s.value: 0 for s in TxState}
    by_process: dict[str, dict[str, int]] = {}
    for r in rows:
        by_state[r.state.value] += r.count
        by_process.setdefault(r.process, {s.value: 0 for s in TxState})[r.state.value] = r.count
    return SummaryReport(
        window=window, process=process, state=state, total=sum(by_state.values()),
        by_state=by_state,
        by_process=[
            ProcessSummary(process=p, total=sum(counts.values()), by_state=counts)
            for p, counts in by_process.items()
        ],
    )


@report_router.get(
    "/reports/stages",
    response_model=StageReport,
    responses={**CSV_RESPONSE, **_errors(401, 422)},
    summary="Stages counted by platform, stage and state",
)
async def stage_report(
    request: Request,
    service: Service,
    process: ProcessFilter = None,
    start: From = None,
    end: To = None,
    format: Format = None,
) -> Any:
    """Stages of the transactions created in `[from, to)`, by platform (and stage) and state."""
    service.check_process(process)
    window, rows = await _report(
        service, "stages", start, end,
        lambda s, e: service.reports.stage_summary_by_platform_and_stage(s, e, process), process,
    )
    if _wants_csv(request, format):
        return _csv(to_csv(rows, ["platform", "stage", "state", "count"]), "stages")
    by_platform: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        by_platform[(r.platform, r.state.value)] += r.count
    return StageReport(
        window=window, process=process,
        by_platform=[
            PlatformStateCountOut(platform=p, state=s, count=n)
            for (p, s), n in by_platform.items()
        ],
        by_stage=[StageStateCountOut.model_validate(d) for d in as_dicts(rows)],
    )


@report_router.get(
    "/reports/errors",
    response_model=ErrorReport,
    responses={**CSV_RESPONSE, **_errors(401, 422)},
    summary="The most frequent error codes",
)
async def error_report(
    request: Request,
    service: Service,
    process: ProcessFilter = None,
    start: From = None,
    end: To = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    format: Format = None,
) -> Any:
    """Error codes of the attempts made in `[from, to)`, most frequent first, with the latest
    description and when each was last seen."""
    service.check_process(process)
    window, rows = await _report(
        service, "errors", start, end,
        lambda s, e: service.reports.top_errors(s, e, process, limit=limit), process, limit,
    )
    if _wants_csv(request, format):
        columns = [
            "process", "platform", "outcome", "error_code", "count", "last_seen", "description"
        ]
        return _csv(to_csv(rows, columns), "errors")
    return ErrorReport(window=window, process=process, errors=as_dicts(rows))


@report_router.get(
    "/reports/overdue",
    response_model=OverdueReport,
    responses={**CSV_RESPONSE, **_errors(401, 422)},
    summary="Waiting transactions past their due time",
)
async def overdue_report(
    request: Request,
    service: Service,
    process: ProcessFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    format: Format = None,
) -> Any:
    """Transactions still waiting past their due time (the earlier of their deadline and
    their process's SLA), most overdue first, with the stage each waits at."""
    service.check_process(process)

    def run() -> tuple[datetime, list[Any]]:
        now = service.tracker.clock()
        return now, service.reports.overdue(process, now=now, limit=limit)

    now, rows = await service.coalescer.run(("overdue", process, limit), run)
    if _wants_csv(request, format):
        return _csv(to_csv(rows), "overdue")
    return OverdueReport(now=now, process=process,
                         items=[OverdueItemOut.model_validate(d) for d in as_dicts(rows)])


@report_router.get(
    "/reports/sla",
    response_model=SlaReport,
    responses={**CSV_RESPONSE, **_errors(401, 422)},
    summary="SLA attainment per process and day",
)
async def sla_report(
    request: Request,
    service: Service,
    process: ProcessFilter = None,
    start: From = None,
    end: To = None,
    format: Format = None,
) -> Any:
    """Of the transactions created in `[from, to)` with a due time, per process and UTC
    creation day: finished within it, late, still open and overdue now; `attainment` is
    within / finished."""
    service.check_process(process)
    window, rows = await _report(
        service, "sla", start, end,
        lambda s, e: service.reports.sla(s, e, process, now=service.tracker.clock()), process,
    )
    if _wants_csv(request, format):
        return _csv(to_csv(rows), "sla")
    days = [SlaDayOut.model_validate(d) for d in as_dicts(rows)]
    totals: dict[str, dict[str, Any]] = {}
    for d in days:
        t = totals.setdefault(d.process, {"process": d.process, "sla_seconds": d.sla_seconds,
                                          **dict.fromkeys(SlaCounts.model_fields, 0)})
        for name in ("transactions", "finished", "within_sla", "late", "open", "overdue"):
            t[name] += getattr(d, name)
    for t in totals.values():
        t["attainment"] = round(t["within_sla"] / t["finished"], 4) if t["finished"] else None
    return SlaReport(window=window, process=process, by_day=days,
                     by_process=[SlaProcessOut.model_validate(t) for t in totals.values()])
