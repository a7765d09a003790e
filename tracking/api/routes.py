"""The endpoints. Each one validates its input, calls ``ApiService`` and shapes the answer.

Blocking database work runs in worker threads (plain ``def`` endpoints, or
``run_in_threadpool``); ``POST /transactions`` goes through the intake batcher (group
commit). The ``/reports/*`` endpoints are in ``tracking.api.reports``.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from tracking.api.errors import ApiError, error_response, validation_error
from tracking.api.schemas import (
    ComponentHealth,
    DeferAction,
    ErrorEnvelope,
    Health,
    OperatorAction,
    ProcessList,
    ProcessOut,
    ProcessQueued,
    ProcessResult,
    PurgeList,
    PurgeOut,
    TransactionDetail,
    TransactionIn,
    TransactionOut,
    TransactionPage,
    check_text,
    to_utc,
)
from tracking.api.service import ApiService, log_transition
from tracking.models import TxState

# Three routers, for the API key (see security.py): create_app puts the key check on the
# writes when a key is set, on the reads when TRACKING_API_KEY_FOR_READS is true too.
open_router = APIRouter()  # /health: probes never need the key
read_router = APIRouter()
write_router = APIRouter()
DB_HEALTH_TIMEOUT = 3.0


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorEnvelope} for status in statuses}


async def get_service(request: Request) -> ApiService:
    """The app's service (built at startup). Async: no worker thread for a dict lookup."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ApiError(503, "SERVICE_STARTING", "the service is not started yet")
    return service


Service = Annotated[ApiService, Depends(get_service)]
Uuid = Annotated[str, "transaction uuid"]
ProcessFilter = Annotated[
    str | None, Query(max_length=64, description="A process code (see GET /processes).")
]
# -- health and catalog ---------------------------------------------------------------------


@open_router.get(
    "/health",
    response_model=Health,
    responses=_errors(503),
    summary="Service, database and Prefect status",
)
async def health(service: Service) -> Any:
    """`200` when the database answers (Prefect's status is reported, never fatal);
    `503 DATABASE_UNAVAILABLE` (envelope, with the health body in `details`) when it does not."""
    database = ComponentHealth(status="error", detail=f"no answer within {DB_HEALTH_TIMEOUT} s")
    with anyio.move_on_after(DB_HEALTH_TIMEOUT):  # a black-holed database must not hang it
        database = await anyio.to_thread.run_sync(
            service.database_health, abandon_on_cancel=True
        )
    prefect = await service.prefect_health()
    body = service.health(database, prefect)
    if database.status != "ok":
        return error_response(
            503, "DATABASE_UNAVAILABLE", "the tracking database does not answer",
            body.model_dump(), headers={"Retry-After": "5"},
        )
    return body


@read_router.get("/processes", response_model=ProcessList, responses=_errors(401))
def processes(service: Service) -> Any:
    """The registered processes: platforms in order with stages and retry policy, and dedup."""
    return ProcessList(
        processes=[ProcessOut.model_validate(p.describe()) for p in service.tracker.processes]
    )


# -- transactions ---------------------------------------------------------------------------


@write_router.post(
    "/transactions",
    response_model=TransactionOut,
    status_code=201,
    responses={200: {"model": TransactionOut, "description": "Duplicate: the existing one"},
               **_errors(401, 413, 422)},
    summary="Submit a transaction (deduplicated)",
)
async def create_transaction(body: TransactionIn, service: Service) -> Any:
    """Validated against the catalog and deduplicated: `201` with the new transaction, `200`
    with the existing one when the payload is a duplicate (same dedup fingerprint; its
    schedule is kept). `priority`, `not_before` and `deadline` travel next to the payload."""
    row, is_new = await service.intake.submit(body.process, body.payload, body.source,
                                              body.schedule())
    if is_new:
        log_transition(row.uuid, None, TxState(row.state), "create")
    # Serialised here, once: the hot path skips FastAPI's re-validation of the model.
    return Response(
        TransactionOut.of(row).model_dump_json(),
        status_code=201 if is_new else 200,
        media_type="application/json",
    )


@read_router.get(
    "/transactions",
    response_model=TransactionPage,
    responses=_errors(401, 422),
    summary="List transactions, newest first",
)
def list_transactions(
    service: Service,
    process: ProcessFilter = None,
    state: Annotated[TxState | None, Query()] = None,
    source: Annotated[str | None, Query(max_length=100)] = None,
    created_from: Annotated[
        datetime | None, Query(description="Inclusive, ISO 8601 (naive values are UTC).")
    ] = None,
    created_to: Annotated[
        datetime | None, Query(description="Exclusive, ISO 8601 (naive values are UTC).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page.")
    ] = None,
) -> Any:
    """Filtered, newest first, a page at a time: follow `next_cursor` until it is null."""
    if source is not None:
        try:
            check_text(source, "source")
        except ValueError as exc:
            raise validation_error(str(exc), field="source") from None
    return service.list(
        process=process, state=state, source=source,
        created_from=to_utc(created_from, "created_from"),
        created_to=to_utc(created_to, "created_to"),
        limit=limit, cursor=cursor,
    )


@read_router.get(
    "/transactions/{uuid}",
    response_model=TransactionDetail,
    responses=_errors(401, 404),
    summary="One transaction with its stages and audit events",
)
def get_transaction(uuid: Uuid, service: Service) -> Any:
    return service.get(uuid)


@write_router.post(
    "/transactions/{uuid}/process",
    response_model=ProcessResult,
    responses={202: {"model": ProcessQueued, "description": "Handed to the deployment"},
               **_errors(401, 404, 409, 503)},
    summary="Run the transaction's runnable stages now",
)
async def process_transaction(uuid: Uuid, service: Service) -> Any:
    """Inline mode: runs the resume flow scoped to this transaction and returns its new state
    (`200`). Deployment mode (`TRACKING_API_PROCESS_MODE=deployment`): creates a flow run of
    the process's deployment and returns `202` with its id. `409 ALREADY_PROCESSED` when
    nothing can run (final state, a stage running, or the next attempt not due yet), also
    when this call's run found the stages taken by a concurrent call (`running`, or `final`
    once that call finished): a `200` always ran at least one stage."""
    before = await run_in_threadpool(service.check_runnable, uuid)
    if service.settings.api_process_mode == "deployment":
        queued = await run_in_threadpool(service.run_on_deployment, uuid, before)
        return JSONResponse(queued.model_dump(mode="json"), status_code=202)
    return await run_in_threadpool(service.run_inline, uuid, before)


@write_router.post(
    "/transactions/{uuid}/cancel",
    response_model=TransactionDetail,
    responses=_errors(401, 404, 409, 422),
    summary="Cancel a transaction that is not final",
)
def cancel_transaction(
    uuid: Uuid, service: Service, body: Annotated[OperatorAction | None, Body()] = None
) -> Any:
    """Open stages become CANCELLED; `409 INVALID_TRANSITION` if it is already final."""
    body = body or OperatorAction()
    return service.cancel(uuid, body.reason, body.actor)


@write_router.post(
    "/transactions/{uuid}/requeue",
    response_model=TransactionDetail,
    responses=_errors(401, 404, 409, 422),
    summary="Give a stopped transaction another go",
)
def requeue_transaction(
    uuid: Uuid, service: Service, body: Annotated[OperatorAction | None, Body()] = None
) -> Any:
    """For EXHAUSTED, TERMINATED, REJECTED and CANCELLED transactions: the stopped stage and
    the later ones are PENDING again with fresh attempts. `409 INVALID_TRANSITION` otherwise."""
    body = body or OperatorAction()
    return service.requeue(uuid, body.reason, body.actor)


@write_router.post(
    "/transactions/{uuid}/defer",
    response_model=TransactionDetail,
    responses=_errors(401, 404, 409, 422),
    summary="Postpone a waiting transaction",
)
def defer_transaction(uuid: Uuid, service: Service, body: DeferAction) -> Any:
    """Its next stage is not due before `until` (a later retry time is kept); a DEFERRED
    event records it. For waiting transactions (PENDING, IN_PROGRESS, TERMINATED) with no
    stage claimed or running now: `409 INVALID_TRANSITION` otherwise, `422` for an `until`
    that is not in the future."""
    return service.defer(uuid, body.until, body.reason, body.actor)


# -- retention ------------------------------------------------------------------------------


@read_router.get("/purges", response_model=PurgeList, responses=_errors(401, 422),
                 summary="The purge audit trail")
def purges(
    service: Service,
    process: ProcessFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """Retention purges (`tracking purge --yes`), newest first: one row per purge run and
    process, with what it archived and deleted (`finished_at` null: running or interrupted)."""
    service.check_process(process)
    return PurgeList(purges=[PurgeOut.model_validate(asdict(r))
                             for r in service.tracker.purge_history(process, limit=limit)])
