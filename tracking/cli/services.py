"""Long-running services and helpers: ``tracking api``, ``serve``, ``demo`` and
``zombie-automation``. Each gets the invocation's settings explicitly (the API app is built
on them, the demo is given their database); none edits the environment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tracking.cli.common import EXIT_OK, BadInput, Cli, Failed


def _service(name: str, call: Callable[[], Any]) -> Any:
    """Run ``call`` (a server or the demo); any error it raises is a failure (exit code 1)."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        raise Failed(f"{name}: {type(exc).__name__}: {exc}") from exc


def api(*, host: str = "127.0.0.1", port: int = 8000, cli: Cli) -> int:
    """Start the HTTP API (uvicorn on tracking.api.create_app, with these settings).

    Parameters
    ----------
    host
        Interface to listen on.
    port
        TCP port.
    """
    if not 0 < port < 65536:
        raise BadInput(f"--port must be from 1 to 65535, got {port}")
    import uvicorn

    from tracking.api import create_app

    _service("api", lambda: uvicorn.run(create_app(cli.settings), host=host, port=port))
    return EXIT_OK


def serve(*, cli: Cli) -> int:
    """Serve every process's hourly deployment from this process (until Ctrl-C).

    The served flow runs read TRACKING_DATABASE_URL from the environment.
    """
    if cli.database_url_option is not None:
        raise BadInput(
            "serve does not take --database-url: the served flow runs read "
            "TRACKING_DATABASE_URL, so set it in the environment instead"
        )

    def serve_all() -> None:
        from deployments.serve import main as serve_main

        serve_main()

    _service("serve", serve_all)
    return EXIT_OK


def demo(*, cli: Cli) -> int:
    """Run the demo end to end: intake the sample file, run it a few times, print reports."""
    def run_demo() -> Any:
        from flows.demo import main as demo_main

        return demo_main(database_url=cli.settings.database_url)

    result = _service("demo", run_demo)
    return result if isinstance(result, int) else EXIT_OK


def zombie_automation(*, cli: Cli) -> int:
    """Create or update the Prefect automation that marks a tracking flow run Crashed when its
    heartbeats stop (its process was killed with kill -9 or its machine died). Run it once
    after `prefect deploy`; running it again updates the automation, never duplicates it.
    """
    from deployments.automations import (
        HEARTBEAT_SECONDS,
        TRACKING_TAG,
        ZOMBIE_AFTER_SECONDS,
        ZOMBIE_AUTOMATION_NAME,
        ensure_zombie_automation,
    )
    from tracking.prefect_server import api_url_configured

    if not api_url_configured():
        raise BadInput("PREFECT_API_URL is not set: point it at the Prefect server of the "
                       "deployments (a temporary server would forget the automation)")
    try:
        automation_id, applied = ensure_zombie_automation()
    except Exception as exc:
        raise Failed(f"zombie-automation: {type(exc).__name__}: {exc}") from exc
    cli.out.print(
        f"{applied} automation {ZOMBIE_AUTOMATION_NAME!r} ({automation_id}): flow runs tagged "
        f"{TRACKING_TAG!r} become Crashed after {ZOMBIE_AFTER_SECONDS} s without a heartbeat "
        f"(they beat every {HEARTBEAT_SECONDS} s)", markup=False, soft_wrap=True,
    )
    return EXIT_OK
