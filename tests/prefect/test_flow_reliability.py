"""The resume flow keeps its promises when runs overlap, batches outlast leases, Prefect
fails around a task run, and the database URL holds a password."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.concurrency._asyncio import ConcurrencySlotAcquisitionError

from tests import flow_processes
from tests.flow_processes import busy, slow_batch
from tracking import StageState, Tracker, connect
from tracking.flows import intake_flow, resume_flow
from tracking.models import EventKind
from tracking.settings import use_database

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _event_kinds(url: str, process: str) -> dict[str, int]:
    engine = connect(url, migrate=True)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT kind, count(*) FROM tx_event WHERE process_code = :p GROUP BY kind"),
            {"p": process},
        ).all()
    engine.dispose()
    return dict(rows)


def test_overlapping_runs_whose_batches_outlast_the_lease_run_each_stage_once(env):
    """The first run holds two batches of 40 calls of 50 ms (2 s) under a 1 s lease; a second
    run starts 1.3 s later: the first run's heartbeat keeps what it holds, so the second
    never takes it over."""
    flow_processes.executions.clear()
    intake_flow(process="SLOW_BATCH", items=[{"id": i, "sleep": 0.05} for i in range(80)])
    results = []

    def run() -> None:
        results.append(resume_flow(process="SLOW_BATCH", granularity="batch", batch_size=40,
                                   concurrency=2, lease_seconds=1))

    first = threading.Thread(target=run)
    first.start()
    time.sleep(1.3)
    second = threading.Thread(target=run)
    second.start()
    first.join(120)
    second.join(120)
    assert sum(r["stages_run"] for r in results) == 80
    assert len(flow_processes.executions) == 80
    assert set(flow_processes.executions.values()) == {1}  # no platform call twice
    kinds = _event_kinds(env, "SLOW_BATCH")
    assert kinds["ATTEMPT"] == 80 and "LEASE_EXPIRED" not in kinds
    tracker = Tracker(connect(env, migrate=True), processes=[slow_batch])
    with tracker.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT attempt, state, count(*) FROM tx_stage WHERE process_code = 'SLOW_BATCH' "
            "GROUP BY attempt, state")).all()
    assert [tuple(r) for r in rows] == [(1, "COMPLETED", 80)]


@contextmanager
def _prefect_fails_once(monkeypatch, at_call: int):
    """Make Prefect's task engine fail (as a 503 on a concurrency slot would) around the
    ``at_call``-th task run, before the task function is called."""
    import prefect.task_engine as task_engine

    real = task_engine._concurrency
    calls = {"n": 0}
    lock = threading.Lock()

    @contextmanager
    def flaky(*args, **kwargs):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == at_call:
            raise ConcurrencySlotAcquisitionError(
                "Unable to acquire concurrency slots: 503 Service Unavailable"
            )
        with real(*args, **kwargs):
            yield

    monkeypatch.setattr(task_engine, "_concurrency", flaky)
    yield calls


@pytest.mark.parametrize("granularity", ["stage", "batch"])
def test_a_prefect_failure_around_one_task_run_does_not_end_the_run(
    env, monkeypatch, granularity
):
    flow_processes.executions.clear()
    uuids = intake_flow(process="BUSY", items=[{"id": i} for i in range(6)])["uuids"]
    with _prefect_fails_once(monkeypatch, at_call=3):
        state = resume_flow(process="BUSY", granularity=granularity, batch_size=2,
                            concurrency=1, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["stages_run"] == (10 if granularity == "stage" else 8)
    # The stages the failed task run never started are runnable again, attempts intact.
    tracker = Tracker(connect(env, migrate=True), processes=[busy])
    stages = tracker.get_stages(uuids, "A", "main")
    unstarted = [s for s in stages if s.state != StageState.COMPLETED]
    assert len(unstarted) == (1 if granularity == "stage" else 2)
    assert all((s.state, s.attempt) == (StageState.PENDING, 0) for s in unstarted)
    events = tracker.get_transaction(unstarted[0].uuid).events
    assert [e.kind for e in events] == [EventKind.CREATED, EventKind.RELEASED]
    # The next run does them: nothing lost, nothing twice.
    assert resume_flow(process="BUSY")["stages_run"] == 2 * len(unstarted)
    assert set(flow_processes.executions.values()) == {1}
    assert len(flow_processes.executions) == 12


def _parameters(flow_run_id: str) -> dict:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).parameters


@pytest.mark.postgres
def test_a_database_password_is_never_a_flow_parameter(monkeypatch, postgres_url):
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.delenv("TRACKING_DATABASE_URL", raising=False)
    # The server trusts local connections: any password works, and must not leak.
    url = sa.make_url(postgres_url).set(password="s3cret-pw").render_as_string(
        hide_password=False)
    with use_database(url):
        intake = intake_flow(process="BUSY", items=[{"id": 1}])
        summary = resume_flow(process="BUSY")
    assert summary["stages_run"] == 2
    for params in (_parameters(summary["flow_run_id"]), intake):
        assert "s3cret-pw" not in repr(params)


def test_the_database_can_come_from_a_prefect_secret_block(monkeypatch, sqlite_url):
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.setenv("TRACKING_DATABASE_URL", "sqlite:////nonexistent/dir/never.db")
    Secret(value=sqlite_url).save("tracking-test-db", overwrite=True)
    intake_flow(process="BUSY", items=[{"id": 1}], database_secret="tracking-test-db")
    summary = resume_flow(process="BUSY", database_secret="tracking-test-db")
    assert summary["stages_run"] == 2
    assert _parameters(summary["flow_run_id"])["database_secret"] == "tracking-test-db"
    assert sqlite_url not in repr(_parameters(summary["flow_run_id"]))


def test_a_worker_run_refuses_a_sqlite_file_in_its_temporary_directory(
    monkeypatch, tmp_path
):
    """A process worker runs each flow in a temporary directory: the default relative
    SQLite file would be created there and deleted after the run, silently doing nothing."""
    workdir = tmp_path / "worker-run"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("TRACKING_PROCESSES", "tests.flow_processes:processes")
    monkeypatch.setenv("TRACKING_DATABASE_URL", "sqlite:///tracking.db")
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "0c4b5c1e-0000-4000-8000-000000000001")
    state = resume_flow(process="BUSY", return_state=True)
    assert state.is_failed()
    assert "relative SQLite path 'tracking.db'" in state.message
    assert "temporary directory" in state.message
    assert not (workdir / "tracking.db").exists()
    # Outside a deployment run (the CLI, the demo) the relative path is the user's choice
    # (set up, as every database, by `tracking db upgrade`).
    monkeypatch.delenv("PREFECT__RUNTIME__DEPLOYMENT__ID")
    connect("sqlite:///tracking.db", migrate=True).dispose()
    assert resume_flow(process="BUSY")["stages_run"] == 0


def test_batches_larger_than_one_claim_still_run(env):
    """concurrency x batch_size above the most one claim may reserve (10,000) is claimed in
    parts, not refused."""
    intake_flow(process="BUSY", items=[{"id": i} for i in range(30)])
    summary = resume_flow(process="BUSY", granularity="batch", batch_size=6000, concurrency=2)
    assert summary["stages_run"] == 60
