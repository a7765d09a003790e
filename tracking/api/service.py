"""What the endpoints do, over the tracker and the reports (no HTTP in here).

``ApiService`` holds the settings, the tracker, the reports, the intake batcher and the two
ways of running a transaction now: inline through the resume flow scoped to it
(``process_runner``) or handed to the process's Prefect deployment (``deployment_runner``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from tracking import __version__
from tracking.api.coalesce import Coalescer
from tracking.api.errors import ApiError, validation_error
from tracking.api.intake import IntakeBatcher
from tracking.api.schemas import (
    ComponentHealth,
    Health,
    ProcessQueued,
    ProcessResult,
    TransactionDetail,
    TransactionOut,
    TransactionPage,
    decode_cursor,
    encode_cursor,
    is_uuid,
)
from tracking.connections import read_only
from tracking.errors import TransactionNotFound, UnknownProcessError
from tracking.models import TxProcess, TxState
from tracking.reports import Reports, report_window
from tracking.settings import Settings, use_database
from tracking.states import FINAL_TX_STATES
from tracking.store import Tracker, reads
from tracking.store.reads import Runnability

logger = logging.getLogger("tracking.api")

PREFECT_HEALTH_TIMEOUT = 1.0

ProcessRunner = Callable[[str, str], Any]
"""Runs the runnable stages of one transaction now: ``(process_code, uuid) -> summary``."""

DeploymentRunner = Callable[[str, str], tuple[str, str]]
"""Hands one transaction to its deployment: ``(process_code, uuid) -> (deployment, run id)``."""


def resume_flow_runner(database_url: str) -> ProcessRunner:
    """The default inline runner: ``tracking.flows.resume_flow`` scoped to the transaction."""

    def run(process: str, uuid: str) -> Any:
        from tracking import flows as runner

        # The URL reaches the flow through the context, never as a (stored, shown) parameter.
        with use_database(database_url):
            return runner.resume_flow(process=process, uuid=uuid)

    return run


def run_on_deployment(process: str, uuid: str) -> tuple[str, str]:
    """The default deployment runner: a flow run of the process's resume deployment."""
    from prefect.deployments import run_deployment

    from tracking.flows import deployment_name

    name = deployment_name(process)
    flow_run = run_deployment(
        name=name, parameters={"process": process, "uuid": uuid}, timeout=0
    )
    return name, str(flow_run.id)


def log_transition(uuid: str, old: TxState | None, new: TxState, action: str) -> None:
    """One log line per transaction state change made through the API."""
    old_value = old.value if old is not None else None
    logger.info(
        "transition",
        extra={"uuid": uuid, "old_state": old_value, "new_state": new.value, "action": action},
    )


def already_processed(r: Runnability, *, held_elsewhere: bool = False) -> ApiError:
    """409 ``ALREADY_PROCESSED`` saying why nothing ran; ``details.reason`` is one of:

    ``final`` (nothing left to run), ``running`` (a stage is claimed right now, or, with
    ``held_elsewhere``, this call's run found the stages taken by another call that may be
    between two stages) or ``not_due`` (the next attempt is later).
    """
    if r.state in FINAL_TX_STATES:
        reason, message = "final", f"transaction is {r.state.value}: nothing left to run"
    elif held_elsewhere and (r.running or r.runnable):
        reason = "running"
        message = "another call or run is processing this transaction: this call ran nothing"
    elif r.running:
        reason, message = "running", "a stage of this transaction is running right now"
    else:
        reason = "not_due"
        message = "no stage is due yet" + (
            f" (next attempt at {r.next_attempt_at.isoformat()})" if r.next_attempt_at else ""
        )
    return ApiError(
        409, "ALREADY_PROCESSED", message,
        {"state": r.state.value, "reason": reason, "next_attempt_at": r.next_attempt_at},
    )


class ApiService:
    """The API's operations. Blocking methods are called from worker threads."""

    def __init__(
        self,
        settings: Settings,
        tracker: Tracker,
        process_runner: ProcessRunner | None = None,
        deployment_runner: DeploymentRunner | None = None,
    ) -> None:
        self.settings = settings
        self.tracker = tracker
        self.reports = Reports(tracker.engine, tracker.clock)
        self.intake = IntakeBatcher(tracker)
        self.coalescer = Coalescer()
        url = tracker.engine.url.render_as_string(hide_password=False)
        self.process_runner = process_runner or resume_flow_runner(url)
        self.deployment_runner = deployment_runner or run_on_deployment

    # -- health ----------------------------------------------------------------------------

    def database_health(self) -> ComponentHealth:
        try:
            with read_only(self.tracker.engine) as conn:
                conn.execute(sa.text("SELECT 1")).scalar_one()
        except Exception as exc:
            logger.warning("health: database check failed: %s", type(exc).__name__)
            return ComponentHealth(status="error", detail=type(exc).__name__)
        return ComponentHealth(status="ok", detail=self.tracker.engine.dialect.name)

    @staticmethod
    async def prefect_health() -> ComponentHealth:
        """Ask ``{PREFECT_API_URL}/health`` (1 s timeout); never raises."""
        try:
            from prefect.settings import get_current_settings

            url = get_current_settings().api.url
        except Exception:  # Prefect misconfigured: say so, do not fail the health check
            return ComponentHealth(status="error", detail="cannot read Prefect settings")
        if not url:
            return ComponentHealth(
                status="not configured",
                detail="PREFECT_API_URL is not set: flows use an ephemeral Prefect server",
            )
        try:
            async with httpx.AsyncClient(timeout=PREFECT_HEALTH_TIMEOUT) as client:
                response = await client.get(f"{url.rstrip('/')}/health")
            if response.status_code == 200:
                return ComponentHealth(status="ok", detail=url)
            return ComponentHealth(status="error", detail=f"{url}: HTTP {response.status_code}")
        except Exception as exc:
            return ComponentHealth(status="unreachable", detail=f"{url}: {type(exc).__name__}")

    @staticmethod
    def health(database: ComponentHealth, prefect: ComponentHealth) -> Health:
        status = "ok" if prefect.status in ("ok", "not configured") else "degraded"
        return Health(status=status, version=__version__, database=database, prefect=prefect)

    # -- catalog ---------------------------------------------------------------------------

    def check_process(self, code: str | None) -> str | None:
        """``code`` when reports and listings may name it (any process in the database's
        catalog, as in the CLI) or None; 422 otherwise."""
        return self.reports.check_process(code)  # UnknownProcessError -> 422

    # -- transactions ----------------------------------------------------------------------

    def get(self, uuid: str) -> TransactionDetail:
        if not is_uuid(uuid):
            raise TransactionNotFound(f"no transaction {uuid!r}")
        return TransactionDetail.of(self.tracker.get_transaction(uuid))

    def list(
        self,
        *,
        process: str | None,
        state: TxState | None,
        source: str | None,
        created_from: datetime | None,
        created_to: datetime | None,
        limit: int,
        cursor: str | None,
    ) -> TransactionPage:
        self.check_process(process)
        if created_from and created_to and created_from > created_to:
            raise validation_error("created_from is after created_to", field="created_from")
        before = decode_cursor(cursor) if cursor else None
        rows = self.reports.list_transactions(
            process=process, state=state, source=source, created_from=created_from,
            created_to=created_to, limit=limit + 1, before=before,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].uuid) if more else None
        return TransactionPage(
            items=[TransactionOut.of(r) for r in rows], limit=limit, next_cursor=next_cursor
        )

    def runnability(self, uuid: str) -> Runnability:
        """State of the transaction and whether a stage of it can be claimed now."""
        if not is_uuid(uuid):
            raise TransactionNotFound(f"no transaction {uuid!r}")
        return reads.runnability(self.tracker.engine, uuid, self.tracker.clock())

    def check_runnable(self, uuid: str) -> Runnability:
        """The runnability, or 409 ``ALREADY_PROCESSED`` when nothing can run now."""
        r = self.runnability(uuid)
        if r.runnable and r.state not in FINAL_TX_STATES:
            return r
        raise already_processed(r)

    def run_inline(self, uuid: str, before: Runnability) -> ProcessResult:
        """Run the transaction's runnable stages through the resume flow (worker thread).

        A run that claimed nothing (``stages_run == 0``: another call or run holds the
        stages, or finished them meanwhile) is a 409 ``ALREADY_PROCESSED``, never a 200:
        a 200 means this call ran at least one stage.
        """
        self._check_registered(before.process)
        summary = self._run_flow(before.process, uuid)
        stages_run = summary.get("stages_run")
        stages_run = stages_run if isinstance(stages_run, int) else None
        if stages_run == 0:
            raise already_processed(self.runnability(uuid), held_elsewhere=True)
        tx = self.tracker.get_transaction(uuid)
        if tx.state != before.state:
            log_transition(uuid, before.state, tx.state, "process")
        flow_run_id = summary.get("flow_run_id")
        return ProcessResult(
            **TransactionDetail.of(tx).model_dump(),
            previous_state=before.state,
            stages_run=stages_run,
            flow_run_id=str(flow_run_id) if flow_run_id else None,
        )

    def _check_registered(self, process: str) -> None:
        """409 ``PROCESS_NOT_REGISTERED`` when this API cannot run ``process`` inline."""
        try:
            self.tracker.process(process)
        except UnknownProcessError:
            raise ApiError(
                409, "PROCESS_NOT_REGISTERED",
                f"process {process!r} is not in this API's TRACKING_PROCESSES: "
                "it cannot run here",
                {"process": process},
            ) from None

    def _run_flow(self, process: str, uuid: str) -> Mapping[str, Any]:
        """The inline runner's summary (``{}`` if it returns none); 500 if it fails."""
        try:
            summary = self.process_runner(process, uuid)
        except Exception as exc:
            logger.exception("resume flow failed for transaction %s", uuid)
            raise ApiError(
                500, "PROCESS_RUN_FAILED",
                f"the resume flow failed ({type(exc).__name__}); see the logs for request_id",
            ) from None
        return summary if isinstance(summary, Mapping) else {}

    def run_on_deployment(self, uuid: str, before: Runnability) -> ProcessQueued:
        """Hand the transaction to its Prefect deployment (worker thread)."""
        try:
            deployment, flow_run_id = self.deployment_runner(before.process, uuid)
        except Exception as exc:
            logger.warning(
                "could not create a flow run for transaction %s: %s: %s",
                uuid, type(exc).__name__, str(exc)[:300],
            )
            raise ApiError(
                503, "PREFECT_UNAVAILABLE",
                f"could not hand the transaction to its Prefect deployment ({type(exc).__name__})",
                headers={"Retry-After": "30"},
            ) from None
        logger.info(
            "queued",
            extra={"uuid": uuid, "deployment": deployment, "flow_run_id": flow_run_id},
        )
        return ProcessQueued(
            uuid=uuid, process=before.process, state=before.state, deployment=deployment,
            flow_run_id=flow_run_id,
        )

    def cancel(self, uuid: str, reason: str | None, actor: str | None) -> TransactionDetail:
        return self._operate(uuid, "cancel", lambda: self.tracker.cancel(
            uuid, reason=reason or "cancelled through the API", actor=actor or "api"))

    def requeue(self, uuid: str, reason: str | None, actor: str | None) -> TransactionDetail:
        return self._operate(uuid, "requeue", lambda: self.tracker.requeue(
            uuid, reason=reason or "requeued through the API", actor=actor or "api"))

    def defer(self, uuid: str, until: datetime, reason: str | None, actor: str | None
              ) -> TransactionDetail:
        def act() -> TxProcess:
            try:
                return self.tracker.defer(uuid, until=until, actor=actor or "api",
                                          reason=reason or "deferred through the API")
            except ValueError as exc:  # until not in the future
                raise validation_error(str(exc), field="until") from None

        return self._operate(uuid, "defer", act)

    def _operate(self, uuid: str, action: str, act: Callable[[], TxProcess]) -> TransactionDetail:
        """An operator action on one transaction, with its state change logged."""
        before = self._state(uuid)
        tx = act()
        log_transition(uuid, before, tx.state, action)
        return TransactionDetail.of(tx)

    def _state(self, uuid: str) -> TxState:
        if not is_uuid(uuid):
            raise TransactionNotFound(f"no transaction {uuid!r}")
        return reads.runnability(self.tracker.engine, uuid, self.tracker.clock()).state

    # -- reports ---------------------------------------------------------------------------

    def window(self, start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
        """The report window (``tracking.reports.report_window``: ``to`` defaults to now,
        inclusive; ``from`` to 7 days before); 422 when it is reversed or out of range."""
        now = self.tracker.clock() + timedelta(microseconds=1)
        try:
            return report_window(start, end, now=now)
        except ValueError as exc:
            field = "from" if "after" in str(exc) or end is not None else "to"
            raise validation_error(str(exc), field=field) from None
