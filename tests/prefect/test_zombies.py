"""Runs killed with ``kill -9`` do not stay Running: heartbeats and the zombie automation.

The deployments' runs beat every ``HEARTBEAT_SECONDS`` (prefect.yaml, deployments.serve) and
``tracking zombie-automation`` creates or updates, by name, the automation that marks a
``tracking``-tagged run Crashed when its heartbeats stop. Automations are checked against the
Prefect test harness; each test deletes the automations it made.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import pytest
import yaml

from deployments.automations import (
    FINAL_STATE_EVENTS,
    HEARTBEAT_SECONDS,
    TRACKING_TAG,
    ZOMBIE_AFTER_SECONDS,
    ZOMBIE_AUTOMATION_NAME,
    apply_automation,
    ensure_zombie_automation,
    zombie_automation,
)
from tracking.cli import main

ROOT = Path(__file__).resolve().parents[2]
TEST_AUTOMATION = "test: crash zombie flow runs quickly"


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _named(name: str) -> list:
    with _client() as client:
        return client.read_automations_by_name(name)


@pytest.fixture
def automations(prefect_harness):
    """Deletes the automations the test made (a lingering one would judge later tests' runs)."""
    yield
    with _client() as client:
        for name in (ZOMBIE_AUTOMATION_NAME, TEST_AUTOMATION):
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)


# -- configuration ---------------------------------------------------------------------------


def test_heartbeats_are_frequent_enough_for_the_window() -> None:
    assert HEARTBEAT_SECONDS >= 30  # Prefect's minimum
    assert ZOMBIE_AFTER_SECONDS >= 3 * HEARTBEAT_SECONDS  # two missed beats are tolerated
    with pytest.raises(ValueError, match="heartbeat period"):
        zombie_automation(within_seconds=HEARTBEAT_SECONDS)


def test_prefect_yaml_deployments_beat_every_heartbeat_seconds_and_are_tagged() -> None:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS)
        assert TRACKING_TAG in deployment["tags"]


def deploy_prefect_yaml(prefect_file: Path = ROOT / "prefect.yaml") -> str:
    """``prefect --no-prompt deploy --all`` of ``prefect_file`` on the current Prefect server
    (from the checkout, as the README says)."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    for args in (["work-pool", "create", "tracking", "--type", "process"],
                 ["--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]):
        done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_deployed_runs_get_the_heartbeat_frequency(prefect_harness) -> None:
    deploy_prefect_yaml()
    with _client() as client:
        deployment = client.read_deployment_by_name("resume/order-cancellation")
    env = deployment.job_variables["env"]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS)
    assert TRACKING_TAG in deployment.tags


def test_serve_applies_the_automation_then_serves_runs_that_beat(monkeypatch) -> None:
    import deployments.serve as serve

    calls = []
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.setattr(serve, "ensure_zombie_automation", lambda: calls.append("automation"))
    monkeypatch.setattr(serve, "serve", lambda *d, **kw: calls.append((d, kw)))
    serve.main()
    assert calls[0] == "automation"
    deployments, kwargs = calls[1]
    assert kwargs == {"heartbeat_seconds": HEARTBEAT_SECONDS}
    assert deployments and all(TRACKING_TAG in d.tags for d in deployments)


# -- the automation on a Prefect server --------------------------------------------------------


def _check_shape(automation, within: int = ZOMBIE_AFTER_SECONDS) -> None:
    trigger = automation.trigger
    assert automation.enabled
    assert trigger.posture == "Proactive"
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.heartbeat", *FINAL_STATE_EVENTS}
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.within == timedelta(seconds=within)
    assert trigger.match.root == {"prefect.resource.id": "prefect.flow-run.*"}
    related = trigger.match_related
    related = related[0] if isinstance(related, list) else related
    assert related.root == {"prefect.resource.role": "tag",
                            "prefect.resource.id": f"prefect.tag.{TRACKING_TAG}"}
    (action,) = automation.actions
    assert (action.type, action.state.value) == ("change-flow-run-state", "CRASHED")


def test_the_automation_is_created_then_updated_never_duplicated(automations) -> None:
    created_id, applied = ensure_zombie_automation()
    assert applied == "created"
    assert ensure_zombie_automation() == (created_id, "updated")
    (automation,) = _named(ZOMBIE_AUTOMATION_NAME)
    assert automation.id == created_id
    _check_shape(automation)


def test_an_edited_or_duplicated_automation_is_put_back(automations) -> None:
    stale = zombie_automation(within_seconds=600).model_copy(update={"enabled": False})
    with _client() as client:
        client.create_automation(stale)
        client.create_automation(stale)
    assert len(_named(ZOMBIE_AUTOMATION_NAME)) == 2
    automation_id, applied = ensure_zombie_automation()
    assert applied == "updated"
    (automation,) = _named(ZOMBIE_AUTOMATION_NAME)
    assert automation.id == automation_id
    _check_shape(automation)


def test_cli_creates_then_updates_the_automation(automations, capsys) -> None:
    assert main(["zombie-automation"]) == 0
    assert capsys.readouterr().out.startswith(f"created automation {ZOMBIE_AUTOMATION_NAME!r}")
    assert main(["zombie-automation"]) == 0
    assert capsys.readouterr().out.startswith(f"updated automation {ZOMBIE_AUTOMATION_NAME!r}")
    assert len(_named(ZOMBIE_AUTOMATION_NAME)) == 1


def test_cli_refuses_without_a_prefect_server(prefect_harness, capsys) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["zombie-automation"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


# -- end to end: a flow run process killed with kill -9 ----------------------------------------

CANDIDATE = '''
import sys, time
from prefect import flow, tags
from prefect.runtime import flow_run

@flow(name="zombie-candidate")
def candidate() -> None:
    print(flow_run.id, flush=True)
    time.sleep(600)

with tags(*sys.argv[1:]):
    candidate()
'''


def _start_candidate(tmp: Path, *tags: str) -> tuple[subprocess.Popen, UUID]:
    """A flow run process (heartbeats every HEARTBEAT_SECONDS) and its flow run id."""
    from prefect.settings import PREFECT_API_URL

    script = tmp / "candidate.py"
    script.write_text(CANDIDATE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=PREFECT_API_URL.value(), PREFECT_HOME=str(tmp / "home"),
               PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(HEARTBEAT_SECONDS))
    proc = subprocess.Popen([sys.executable, str(script), *tags], env=env, cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    assert line, "the candidate flow did not start"
    return proc, UUID(line)


def _state(flow_run_id: UUID) -> str:
    with _client() as client:
        return client.read_flow_run(flow_run_id).state.type.value


@pytest.mark.slow
def test_a_killed_tracking_run_becomes_crashed_a_live_or_untagged_one_does_not(
    automations, tmp_path
) -> None:
    within = HEARTBEAT_SECONDS + 10  # a short window: the test waits for it
    quick = zombie_automation(within_seconds=within).model_copy(update={"name": TEST_AUTOMATION})
    with _client() as client:
        apply_automation(client, quick)
    procs = []
    try:
        for name, tags in (("killed", [TRACKING_TAG]), ("untagged", []), ("alive", [TRACKING_TAG])):
            (tmp_path / name).mkdir()
            procs.append(_start_candidate(tmp_path / name, *tags))
        (killed, killed_id), (untagged, untagged_id), (_, alive_id) = procs
        time.sleep(3)  # the first heartbeat (sent when the run starts) reaches the server
        for proc in (killed, untagged):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + within + 60
        while _state(killed_id) != "CRASHED" and time.monotonic() < deadline:
            time.sleep(2)
        assert _state(killed_id) == "CRASHED"
        assert _state(untagged_id) == "RUNNING"  # not a tracking run: not judged
        assert _state(alive_id) == "RUNNING"  # still beating
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
