"""The HTTP intake and reporting API over the tracking store (FastAPI).

Run it with ``tracking api`` or ``uvicorn --factory tracking.api:create_app`` (settings from
``TRACKING_*`` variables, read at startup), or build an app of your own::

    from tracking.api import create_app
    app = create_app(settings, tracker=tracker)      # tests inject settings and a tracker

Creating the app does no I/O: the database connection, the migrations and the registration
of the processes listed in ``TRACKING_PROCESSES`` happen in the app's lifespan (startup).
Without ``PREFECT_API_URL``, the first inline run starts Prefect's temporary server; the
lifespan's shutdown stops it (SIGTERM included), so stopping the API leaves nothing running.
See README.md, section "HTTP API", for the endpoints, and section "Dashboard" for the HTML
pages of ``tracking/api/dashboard.py`` (``GET /dashboard``).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi

from tracking import __version__
from tracking.api.dashboard import install_dashboard
from tracking.api.errors import ApiError, install_handlers
from tracking.api.logs import configure_logging
from tracking.api.middleware import RequestMiddleware
from tracking.api.reports import report_router
from tracking.api.routes import open_router, read_router, write_router
from tracking.api.security import ApiKey, settings_of
from tracking.api.service import (
    ApiService,
    DeploymentRunner,
    ProcessRunner,
    resume_flow_runner,
    run_on_deployment,
)
from tracking.app import App
from tracking.memory import startup_objects_frozen
from tracking.prefect_server import TemporaryServer
from tracking.settings import Settings, get_settings
from tracking.store import Tracker

DESCRIPTION = """Intake and reporting for tracked transactions: submit items (deduplicated),
follow their stages and audit events, run them now, cancel or requeue them, and report.
Every error has the body `{"error": {"code", "message", "details"}, "request_id"}`."""


def _warm_up() -> None:
    """Import Prefect's settings now (seconds), not in the first health check."""
    import prefect.settings  # noqa: F401


def _open_tracker(settings: Settings) -> Tracker:
    """Connect (the API's startup migrates) and register the configured processes."""
    return App.open(settings, migrate=True).tracker()


def _on_temporary_server(
    server: TemporaryServer,
    tracker: Tracker,
    process_runner: ProcessRunner | None,
    deployment_runner: DeploymentRunner | None,
) -> tuple[ProcessRunner, DeploymentRunner]:
    """The runners; the default ones start ``server`` first (when no PREFECT_API_URL is set),
    so the temporary Prefect server is the app's and stops with it. Injected ones are kept."""
    if process_runner is None:
        url = tracker.engine.url.render_as_string(hide_password=False)
        process_runner = server.wrap(resume_flow_runner(url))
    if deployment_runner is None:
        deployment_runner = server.wrap(run_on_deployment)
    return process_runner, deployment_runner


def create_app(
    settings: Settings | None = None,
    tracker: Tracker | None = None,
    *,
    process_runner: ProcessRunner | None = None,
    deployment_runner: DeploymentRunner | None = None,
) -> FastAPI:
    """Build the API.

    Args:
        settings: default ``get_settings()`` at startup.
        tracker: default: one on ``settings.database_url`` with the processes of
            ``settings.processes`` registered, created at startup and disposed at shutdown.
        process_runner: ``(process_code, uuid) -> summary``, runs a transaction inline;
            default ``tracking.flows.resume_flow`` on the tracker's database.
        deployment_runner: ``(process_code, uuid) -> (deployment, flow_run_id)``; default
            ``prefect.deployments.run_deployment`` on ``tracking.flows.deployment_name``.
    """

    def start(app: FastAPI, s: Settings, t: Tracker, server: TemporaryServer | None = None) -> None:
        runners = (process_runner, deployment_runner)
        if server is not None:
            runners = _on_temporary_server(server, t, *runners)
        app.state.settings = s
        app.state.service = ApiService(s, t, *runners)
        _include_routes(app, s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        s = settings or get_settings()
        configure_logging(s.log_level, s.log_json)
        await run_in_threadpool(_warm_up)
        own = tracker is None
        t = tracker or await run_in_threadpool(_open_tracker, s)
        prefect_server = TemporaryServer()
        start(app, s, t, prefect_server)
        try:
            with startup_objects_frozen():  # no ~100 ms full collections in a request
                yield
        finally:
            await run_in_threadpool(prefect_server.stop)
            if own:
                t.engine.dispose()

    app = FastAPI(
        title="prefect-tracking API",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = None
    app.state.key_wiring = None
    app.state.api_routes = []
    if settings is not None:
        _include_routes(app, settings)  # else at startup, once the settings are read
        if tracker is not None:
            start(app, settings, tracker)  # usable without running the lifespan

    install_handlers(app)
    install_dashboard(app)  # HTML pages: not in the OpenAPI document, their own error page
    app.add_middleware(RequestMiddleware, get_settings=functools.partial(settings_of, app))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _include_routes(app: FastAPI, settings: Settings) -> None:
    """Include the endpoints, with the API key check (``security.ApiKey``) on the writes
    when a key is set and on the reads too with ``api_key_for_reads`` (``/health`` never).

    The OpenAPI document follows from the routes: the ``ApiKey`` scheme on exactly the
    operations that need it. Done when the settings are known; again only if a new startup
    brings settings that change which routes need the key.
    """
    wiring = (bool(settings.api_key), bool(settings.api_key and settings.api_key_for_reads))
    if app.state.key_wiring == wiring:
        return
    app.router.routes[:] = [r for r in app.router.routes if r not in app.state.api_routes]
    before = len(app.router.routes)
    app.include_router(open_router)
    app.include_router(read_router, dependencies=[ApiKey] if wiring[1] else None)
    app.include_router(report_router, dependencies=[ApiKey] if wiring[1] else None)
    app.include_router(write_router, dependencies=[ApiKey] if wiring[0] else None)
    app.state.api_routes = app.router.routes[before:]
    app.state.key_wiring = wiring
    app.openapi_schema = None


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, with the registered process codes as examples."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    service: ApiService | None = app.state.service
    processes = service.tracker.processes if service else []
    if processes:
        model = schema["components"]["schemas"]["TransactionIn"]
        model["properties"]["process"]["examples"] = [p.code for p in processes]
        model["examples"] = [
            {
                "process": p.code,
                "payload": {field: f"example-{i}" for field in p.dedup.describe()["fields"]}
                or {"example": i},
                "source": "api",
            }
            for i, p in enumerate(processes, 1)
        ]
    if service is not None:
        app.openapi_schema = schema
    return schema


__all__ = ["ApiError", "create_app"]
