"""The API stops what it started: ``tracking api`` without PREFECT_API_URL, SIGTERM.

Processing a transaction inline makes Prefect start a temporary server (a subprocess of the
API). One scenario runs once for the module: start ``tracking api`` in a session of its own,
submit and process a demo transaction, send SIGTERM; the tests then check what is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

PAYLOAD = {
    "request_id": "FE-9001", "order_id": "SO-9001", "customer": "Globex", "amount": 120,
    "customer_status": "active", "order_status": "open",
}
SERVER_APP = "prefect.server.api.server:create_app"


@dataclass
class Scenario:
    """What the run of the API left behind."""

    api_pid: int
    process_status: int
    server_pid: int
    server_port: int
    server_env: dict[str, str]
    exit_code: int
    survivors: list[tuple[int, str]]
    server_answers: bool
    log: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], sid [3])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> list[int]:
    """Living processes whose ancestry leads to ``root``."""
    parents = {pid: int(s[1]) for pid in _pids() if (s := _stat(pid)) and s[0] != "Z"}
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found += frontier
    return found


def session_members(sid: int) -> list[int]:
    """Living (not zombie) processes of session ``sid``."""
    return [pid for pid in _pids() if (s := _stat(pid)) and s[0] != "Z" and int(s[3]) == sid]


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the API exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("the API did not become healthy")


def api_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TRACKING_"))}
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        TRACKING_DATABASE_URL=f"sqlite:///{tmp / 'tracking.db'}",
        TRACKING_PROCESSES="flows.order_cancellation:process",
    )
    return env


def run_scenario(tmp: Path) -> Scenario:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp / "api.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracking", "api", "--port", str(port)],
        cwd=tmp, env=api_env(tmp), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(url, proc)
        created = httpx.post(f"{url}/transactions", timeout=30,
                             json={"process": "ORDER_CANCELLATION", "payload": PAYLOAD})
        assert created.status_code == 201, created.text
        uuid = created.json()["uuid"]
        processed = httpx.post(f"{url}/transactions/{uuid}/process", timeout=180)
        servers = [p for p in descendants(proc.pid) if SERVER_APP in cmdline(p)]
        assert servers, "processing inline should have started a temporary Prefect server"
        argv = cmdline(servers[0])
        server_port = int(argv[argv.index("--port") + 1])
        server_env = environ(servers[0])
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
        time.sleep(1)  # a process being re-parented has had time to show up
        survivors = [(pid, " ".join(cmdline(pid))[:160]) for pid in session_members(proc.pid)]
        scenario = Scenario(
            api_pid=proc.pid, process_status=processed.status_code, server_pid=servers[0],
            server_port=server_port, server_env=server_env, exit_code=exit_code,
            survivors=survivors, server_answers=answers(server_port), log="",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in session_members(proc.pid):  # leave nothing behind, even when failing
            os.kill(pid, signal.SIGKILL)
        log.seek(0)
        text = log.read()
        log.close()
    scenario.log = text
    return scenario


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> Scenario:
    return run_scenario(tmp_path_factory.mktemp("api-shutdown"))


def test_processing_inline_worked(scenario: Scenario) -> None:
    assert scenario.process_status == 200, scenario.log[-3000:]


def test_sigterm_leaves_no_process_behind(scenario: Scenario) -> None:
    assert scenario.survivors == [], (
        f"still running after the API stopped: {scenario.survivors}\n{scenario.log[-3000:]}"
    )
    assert not scenario.server_answers, "the temporary Prefect server still answers"


def test_temporary_server_runs_without_telemetry(scenario: Scenario) -> None:
    """Its telemetry heartbeat wrote to its SQLite database and logged 'database is locked'."""
    assert scenario.server_env.get("PREFECT_SERVER_ANALYTICS_ENABLED") == "False"


def test_api_log_has_no_traceback(scenario: Scenario) -> None:
    assert "Traceback" not in scenario.log, scenario.log
