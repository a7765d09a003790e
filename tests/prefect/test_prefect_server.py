"""Prefect's temporary server is started quietly (telemetry off) by the commands that run flows.

The subprocess checks (the server really stops, its environment) are in test_api_shutdown.py
and test_demo.py; these are the fast ones.
"""

from __future__ import annotations

import json

from tracking.cli import main
from tracking.prefect_server import TemporaryServer, quiet_settings


def test_quiet_settings_turn_telemetry_off_for_the_server_subprocess() -> None:
    from prefect.settings import get_current_settings

    with quiet_settings():
        env = get_current_settings().to_environment_variables(exclude_unset=True)
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "False"
    assert "PREFECT_SERVER_LOGGING_LEVEL" in env


def test_quiet_settings_give_the_server_time_to_start_on_a_busy_machine() -> None:
    """Prefect's default 20 s failed `make demo` while the machine was busy."""
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    with quiet_settings():
        assert get_current_settings().server.ephemeral.startup_timeout_seconds >= 120
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 45}):
        with quiet_settings():  # a value the user set is kept
            assert get_current_settings().server.ephemeral.startup_timeout_seconds == 45


def test_tracking_run_runs_its_flow_under_the_quiet_settings(tmp_path, monkeypatch, capsys):
    import tracking.flows

    seen = []

    def resume_flow(**kwargs):
        from prefect.settings import get_current_settings

        seen.append(get_current_settings().server.analytics_enabled)
        return {"process": kwargs["process"], "stages_run": 0}

    monkeypatch.setattr(tracking.flows, "resume_flow", resume_flow)
    url = f"sqlite:///{tmp_path / 'tracking.db'}"
    assert main(["--database-url", url, "run", "ORDER_CANCELLATION", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages_run"] == 0
    assert seen == [False]


def test_an_unstarted_server_stops_without_touching_prefect() -> None:
    server = TemporaryServer()
    server.stop()  # nothing was started here: nothing to stop, no error
    assert server.api_url is None and server.pid is None
