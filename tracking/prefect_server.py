"""Prefect's temporary server, for a process that runs flows without ``PREFECT_API_URL``.

Without ``PREFECT_API_URL`` Prefect starts a temporary server subprocess the first time a
flow runs (``prefect.server.api.server.SubprocessASGIServer``) and relies on ``atexit`` to
stop it, which never runs when the process dies of a signal (uvicorn re-raises SIGTERM after
its shutdown). ``TemporaryServer`` makes the owner explicit: whoever starts it stops it::

    with temporary_server() as server:
        server.start()          # no-op when PREFECT_API_URL is set
        resume_flow(...)

``quiet_settings()`` is for a short-lived command that lets Prefect start (and, at exit,
stop) the server itself. Both start the server quietly: telemetry off (the temporary server's
``send_telemetry_heartbeat`` writes to its SQLite database while the first flow runs and logs
a ``database is locked`` traceback) and its log level CRITICAL unless
``PREFECT_SERVER_LOGGING_LEVEL`` is set (it logs ``CancelledError`` tracebacks when stopped).
The settings reach the subprocess through Prefect's settings context, not ``os.environ``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

R = TypeVar("R")

#: How long the temporary server may take to start (unless
#: ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` says otherwise).
STARTUP_SECONDS = 180


def _settings() -> dict[str, Any]:
    """Keyword arguments of ``temporary_settings`` for starting the temporary server."""
    from prefect.settings import (
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_SERVER_LOGGING_LEVEL,
    )

    return {
        "updates": {PREFECT_SERVER_ANALYTICS_ENABLED: False},
        # Prefect's 20 s is too short on a busy 2-CPU machine: `make demo` failed with
        # "Timed out while attempting to connect to ephemeral Prefect API server".
        "set_defaults": {PREFECT_SERVER_LOGGING_LEVEL: "CRITICAL",
                         PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: STARTUP_SECONDS},
    }


@contextmanager
def quiet_settings() -> Iterator[None]:
    """Settings under which a temporary server started in this block (by Prefect itself, in
    this thread, or by ``TemporaryServer.start``) is quiet; nothing is started here."""
    from prefect.settings import temporary_settings

    with temporary_settings(**_settings()):
        yield


def api_url_configured() -> bool:
    """True when ``PREFECT_API_URL`` points at a Prefect server (none is started then)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


class TemporaryServer:
    """Prefect's temporary server of this process: started on demand, stopped by ``stop``.

    Thread-safe. When ``PREFECT_API_URL`` is set, ``start`` does nothing and ``stop`` leaves
    whatever server that is alone.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._server: Any = None  # prefect's SubprocessASGIServer, once started here

    @property
    def api_url(self) -> str | None:
        """The temporary server's API URL while it runs (started here), else None."""
        return self._server.api_url if self._server is not None else None

    @property
    def pid(self) -> int | None:
        """The temporary server's process id while it runs (started here), else None."""
        process = self._server.server_process if self._server is not None else None
        return process.pid if process is not None else None

    def start(self) -> str | None:
        """Start the server unless ``PREFECT_API_URL`` is set or it runs; its API URL."""
        with self._lock:
            if self._server is None and not api_url_configured():
                from prefect.server.api.server import SubprocessASGIServer

                with quiet_settings():
                    server = SubprocessASGIServer()  # the instance Prefect's clients use
                    server.start()
                self._server = server
            return self.api_url

    def stop(self) -> None:
        """Stop the server if ``start`` started it (waits for it to exit).

        Prefect's log and event workers send to the server in the background: they are
        drained first, or they would fail (and retry at exit) against a stopped server.
        """
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            _drain_prefect_workers()
            server.stop()

    def wrap(self, call: Callable[..., R]) -> Callable[..., R]:
        """``call`` that first makes sure the server runs (when one is needed)."""

        def started_first(*args: Any, **kwargs: Any) -> R:
            self.start()
            return call(*args, **kwargs)

        return started_first


def _drain_prefect_workers(timeout: float = 10) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout)
        except Exception:  # a worker that cannot drain must not keep the server running
            pass


@contextmanager
def temporary_server() -> Iterator[TemporaryServer]:
    """A ``TemporaryServer`` that is stopped on exit, however the block ends."""
    server = TemporaryServer()
    try:
        yield server
    finally:
        server.stop()
