"""The Prefect layer: tracked tasks inside real flow runs, artifacts, deployments, the demo."""

from __future__ import annotations

import inspect
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from prefect import Task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

from tests import flow_processes
from tests.flow_processes import BEHAVIOURS, busy, do_what_the_payload_says, outcomes
from tracking import Reports, StageState, Tracker, TxState, connect
from tracking.decorator import TxContext, tracked_task
from tracking.flows import deployment_name, intake_flow, resume_flow
from tracking.items import read_items
from tracking.models import EventKind

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture
def sqlite_env(monkeypatch, sqlite_url: str) -> str:
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.setenv("TRACKING_DATABASE_URL", sqlite_url)
    return sqlite_url


def _by_behaviour(url: str) -> dict[str, object]:
    tracker = Tracker(connect(url, migrate=True), processes=[outcomes])
    reports = Reports(tracker.engine)
    now = datetime.now(UTC)
    txs = reports.transactions_between(now - timedelta(hours=1), now + timedelta(hours=1))
    return {tx.payload["behaviour"]: tracker.get_transaction(tx.uuid) for tx in txs}


def _task_runs(flow_run_id: str, *names: str) -> dict[str, object]:
    """The flow run's task runs by name, once ``names`` are recorded in a final state
    (Prefect records task run states through an asynchronous event pipeline)."""
    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        by_name = {run.name: run for run in runs}
        ready = all(n in by_name and by_name[n].state and by_name[n].state.is_final()
                    for n in names)
        if ready or time.monotonic() > deadline:
            return by_name
        time.sleep(0.5)


def _intake_all_behaviours() -> None:
    result = intake_flow(process="OUTCOMES", items=[{"id": b, "behaviour": b} for b in BEHAVIOURS])
    assert (result["new"], result["duplicates"]) == (len(BEHAVIOURS), 0)


def test_outcomes_inside_real_task_runs(env):
    _intake_all_behaviours()
    summary = resume_flow(process="OUTCOMES")  # returns normally: failed items are outcomes
    txs = _by_behaviour(env)

    def p_stage(behaviour):
        return txs[behaviour].stages[0]

    for ok in ("ok", "ok_result"):
        assert txs[ok].state == TxState.COMPLETED  # P, then Q.first, Q.second in one run
    for behaviour, code in (("business", 5), ("raise_business", 12)):
        assert (p_stage(behaviour).state, p_stage(behaviour).error_code) == (
            StageState.REJECTED, code)
        assert txs[behaviour].state == TxState.REJECTED
        assert p_stage(behaviour).attempt == 1  # business errors are never retried
    assert p_stage("raise_business").error_description == "customer unknown"
    for behaviour, code in (("system", -3), ("raise_system", -7), ("raise", -1)):
        stage = p_stage(behaviour)
        assert (stage.state, stage.error_code, stage.attempt) == (StageState.TERMINATED, code, 3)
    assert p_stage("raise").error_description == "ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in txs["raise"].events[-1].traceback
    for behaviour in ("bool", "float", "str", "none"):
        stage = p_stage(behaviour)
        assert (stage.state, stage.error_code) == (StageState.TERMINATED, -1)
        assert "returned an invalid result" in stage.error_description
        assert "error code must be an int" in stage.error_description

    runs = _task_runs(
        summary["flow_run_id"], "P.main ok", "P.main business", "P.main system", "Q.second ok"
    )
    assert (runs["P.main ok"].state.name, runs["P.main ok"].state.type.value) == (
        "Completed", "COMPLETED")
    assert (runs["P.main business"].state.name, runs["P.main business"].state.type.value) == (
        "Rejected", "COMPLETED")
    assert (runs["P.main system"].state.name, runs["P.main system"].state.type.value) == (
        "SystemError", "FAILED")
    assert runs["Q.second ok"].state.name == "Completed"
    # Tags go on the flow run: a tagged task run costs Prefect concurrency-slot API calls.
    assert set(runs["P.main ok"].tags) == set()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(summary["flow_run_id"])
    assert {"process:OUTCOMES", "platform:P", "platform:Q"} <= set(flow_run.tags)
    assert summary["by_platform"]["P"] == {"COMPLETED": 2, "REJECTED": 2, "TERMINATED": 7}


def test_in_run_retries_count_as_attempts_against_max_attempts(sqlite_env):
    intake_flow(process="OUTCOMES", items=[{"id": "s", "behaviour": "system"}])
    first = resume_flow(process="OUTCOMES")
    tx = _by_behaviour(sqlite_env)["system"]
    attempts = [e for e in tx.events if e.kind == EventKind.ATTEMPT]
    assert [e.attempt for e in attempts] == [1, 2, 3]  # the first try and two in-run retries
    assert {e.flow_run_id for e in attempts} == {first["flow_run_id"]}
    assert len({e.task_run_id for e in attempts}) == 1  # retries of one task run

    second = resume_flow(process="OUTCOMES")  # the next hourly run: 2 attempts left of 5
    tx = _by_behaviour(sqlite_env)["system"]
    assert [e.attempt for e in tx.events if e.kind == EventKind.ATTEMPT] == [1, 2, 3, 4, 5]
    assert tx.stages[0].state == StageState.EXHAUSTED and tx.state == TxState.EXHAUSTED
    assert _task_runs(second["flow_run_id"], "P.main s")["P.main s"].state.name == "Exhausted"
    assert resume_flow(process="OUTCOMES")["stages_run"] == 0


def test_artifacts_are_published(sqlite_env):
    _intake_all_behaviours()
    summary = resume_flow(process="OUTCOMES")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[summary["flow_run_id"]])
            )
        )
    by_key = {a.key: a for a in artifacts}
    assert by_key["resume-progress-outcomes"].type == "progress"
    assert by_key["resume-progress-outcomes"].data == 100.0
    table = by_key["resume-outcomes-outcomes"]
    assert table.type == "table"
    assert {"platform": "P", "outcome": "REJECTED", "stages": 2} in yaml.safe_load(table.data)
    markdown = by_key["resume-summary-outcomes"]
    assert markdown.type == "markdown"
    assert "Top error codes" in markdown.data and "| P | -3 |" in markdown.data
    report = by_key["tracking-report-outcomes"]
    assert report.type == "markdown" and "Transactions by state" in report.data


def test_batch_granularity_tracks_every_item(sqlite_env):
    _intake_all_behaviours()
    summary = resume_flow(process="OUTCOMES", granularity="batch", batch_size=4)
    txs = _by_behaviour(sqlite_env)
    assert txs["ok"].state == TxState.COMPLETED
    assert txs["business"].state == TxState.REJECTED
    assert txs["system"].stages[0].attempt == 1  # no in-run retries in batch granularity
    assert summary["stages_run"] == len(BEHAVIOURS) + 4  # P for all, Q's two stages for 2
    expected = {"P.main x4", "P.main x3", "Q.first x2", "Q.second x2"}
    names = set(_task_runs(summary["flow_run_id"], *expected))
    assert expected <= names
    event = txs["ok"].events[1]
    assert event.flow_run_id == summary["flow_run_id"] and event.task_run_id


@pytest.mark.slow  # 300 task runs: next to another end-to-end test, 5x as long
def test_two_concurrent_resume_runs_never_double_process(env):
    flow_processes.executions.clear()
    tracker = Tracker(connect(env, migrate=True), processes=[busy])
    tracker.start_many("BUSY", [{"id": i} for i in range(150)])
    results = []

    def run() -> None:
        results.append(resume_flow(process="BUSY", batch_size=10, concurrency=4))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert sum(r["stages_run"] for r in results) == 300
    assert len(flow_processes.executions) == 300
    assert set(flow_processes.executions.values()) == {1}  # each stage executed once
    with tracker.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT attempt, state, count(*) FROM tx_stage WHERE process_code='BUSY' "
            "GROUP BY attempt, state"
        ).all()
    assert [tuple(r) for r in rows] == [(1, "COMPLETED", 300)]


def test_flow_fails_when_it_cannot_do_its_job(monkeypatch):
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.setenv("TRACKING_DATABASE_URL", "postgresql://nobody:pw-9@127.0.0.1:1/none")
    state = resume_flow(process="OUTCOMES", return_state=True)
    assert state.is_failed()
    # It says which database failed, without its password.
    assert "the tracking database postgresql+psycopg://nobody:***@127.0.0.1:1/none failed" in (
        state.message)
    assert "pw-9" not in state.message
    state = resume_flow(process="NO_SUCH_PROCESS", return_state=True)
    assert state.is_failed() and "unknown process" in state.message.lower() + str(
        state.result(raise_on_failure=False)).lower()


def test_platform_task_is_a_real_prefect_task():
    """The platform function stays plain; the Prefect edge builds its tracked task, which
    wraps it (name, docstring, signature) with the platform's Prefect options."""
    platform = outcomes.get_platform("P")
    task = tracked_task(outcomes, platform)
    assert isinstance(task, Task)
    assert task.retries == 2
    assert task.fn.__wrapped__ is do_what_the_payload_says
    assert task.fn.__name__ == do_what_the_payload_says.__name__
    assert inspect.signature(task.fn) == inspect.signature(do_what_the_payload_says)
    assert do_what_the_payload_says(TxContext({"behaviour": "business"})) == 5
    assert do_what_the_payload_says(TxContext({"behaviour": "ok"})) == 0


def test_intake_from_files(sqlite_env, tmp_path):
    csv_file = tmp_path / "items.csv"
    csv_file.write_text("id,behaviour\nc1,ok\nc2,business\nc1,ok\n")
    result = intake_flow(process="OUTCOMES", path=str(csv_file))
    assert (result["total"], result["new"], result["duplicates"]) == (3, 2, 1)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"id": "c2", "behaviour": "business"}\n\n{"id": "j1", "behaviour": "ok"}\n')
    result = intake_flow(process="OUTCOMES", path=str(jsonl))
    assert (result["new"], result["duplicates"]) == (1, 1)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"id": 1}\n{"id": \n', "line 2"),
        ("list.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
        ("bad.csv", "id,behaviour\nx,ok,extra\n", "line 2: wrong number of columns"),
        ("bad.xml", "<x/>", "unsupported file type"),
    ],
)
def test_read_items_names_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_items(path)
    with pytest.raises(ValueError, match="cannot read"):
        read_items(tmp_path / "missing.csv")


def test_demo_end_to_end(monkeypatch, tmp_path):
    from flows import demo, order_cancellation

    monkeypatch.setenv("TRACKING_PROCESSES", "flows.order_cancellation:process")
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert demo.main(runs=3, database_url=url) == 0
    reports = Reports(connect(url, migrate=True))
    now = datetime.now(UTC)
    window = (now - timedelta(hours=1), now + timedelta(hours=1))
    by_state = {r.state: r.count for r in reports.summary_by_state(*window)}
    items = read_items(demo.SAMPLE_FILE)
    rejected = {
        i["request_id"] for i in items
        if i["customer_status"] == "blocked" or i["order_status"] == "shipped"
        or float(i["amount"]) > order_cancellation.REFUND_APPROVAL_LIMIT
    }
    unique = {i["request_id"] for i in items}
    assert by_state == {TxState.REJECTED: len(rejected), TxState.COMPLETED: len(unique - rejected)}
    errors = {(e.platform, e.error_code) for e in reports.top_errors(*window)}
    assert {("SAP", -5), ("MAIL", -1), ("CRM", 10), ("SAP", 20), ("SAP", 21)} <= errors


def test_prefect_yaml_is_valid_for_prefect(monkeypatch):
    from prefect.cli.deploy._models import PrefectYamlModel

    from tracking.catalog import load_processes
    from tracking.settings import DEFAULT_PROCESSES

    config = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "prefect.yaml").read_text()))
    assert config.deployments
    known = {p.code for p in load_processes(DEFAULT_PROCESSES)}
    for deployment in config.deployments:
        flow = load_flow_from_entrypoint(deployment.entrypoint)
        flow.validate_parameters(deployment.parameters)
        process = deployment.parameters["process"]
        assert process in known
        assert f"{flow.name}/{deployment.name}" == deployment_name(process)
        (schedule,) = deployment.schedules
        cron = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
        assert cron.cron == "0 * * * *"
        assert deployment.work_pool.name


def test_serve_builds_an_hourly_deployment_per_process(monkeypatch):
    from deployments.serve import build_deployments

    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    deployments = build_deployments()
    assert [d.name for d in deployments] == ["outcomes", "busy", "slow", "slow-batch", "sessions"]
    for d in deployments:
        assert d.schedules[0].schedule.cron == "0 * * * *"
        assert d.parameters["process"] in ("OUTCOMES", "BUSY", "SLOW", "SLOW_BATCH", "SESSIONS")


def test_a_timed_out_task_run_is_recorded_as_a_system_error(sqlite_env):
    intake_flow(process="SLOW", items=[{"id": 1}])
    summary = resume_flow(process="SLOW")
    tracker = Tracker(connect(sqlite_env, migrate=True), processes=[flow_processes.slow])
    now = datetime.now(UTC)
    (tx,) = Reports(tracker.engine).transactions_between(now - timedelta(hours=1), now)
    stage = tracker.get_transaction(tx.uuid).stages[0]
    assert (stage.state, stage.error_code, stage.attempt) == (StageState.TERMINATED, -1, 1)
    assert "without recording" in stage.error_description
    assert summary["by_platform"] == {"S": {"TERMINATED": 1}}
    assert _task_runs(summary["flow_run_id"], "S.main 1")["S.main 1"].state.name == "TimedOut"


def test_prefect_deploy_accepts_prefect_yaml(tmp_path):
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    prefect = [sys.executable, "-m", "prefect"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefect, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)

    run("work-pool", "create", "tracking", "--type", "process")
    result = run("--no-prompt", "deploy", "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resume/order-cancellation" in result.stdout
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("resume/order-cancellation")
    assert deployment.parameters["process"] == "ORDER_CANCELLATION"
    assert deployment.schedules[0].schedule.cron == "0 * * * *"
    assert deployment.work_pool_name == "tracking"
