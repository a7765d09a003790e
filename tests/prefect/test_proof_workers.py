"""Standing proof: several Prefect process workers on one PostgreSQL tracking database.

A real Prefect server (``prefect server start``, its database on PostgreSQL), a process work
pool, three ``prefect worker start --pool ... --type process`` subprocesses set up the way a
worker machine is (``TRACKING_DATABASE_URL``, ``TRACKING_PROCESSES``, ``PYTHONPATH``,
``PREFECT_API_URL``), and the resume deployment of the PROOF process
(``tests/proof_processes.py``). 2,000 items; five overlapping flow runs of the deployment
(three in batch granularity, two in stage granularity), then more runs until nothing is
runnable. Every platform call appends a line to a side-effect log; the proof is that the log
and the audit trail agree one to one (no attempt recorded twice, no side effect unrecorded),
and that the final states are what the deterministic outcome pattern implies.

Needs ``TRACKING_TEST_POSTGRES_URL``; marked ``slow``.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter

import pytest
import yaml

from tests.pg import asyncpg_url, fresh_database
from tests.proof_processes import PLATFORMS, expected, proof, proof_items
from tests.proof_support import (
    BIN,
    ROOT,
    audit_problems,
    base_env,
    duplicates,
    engine_for,
    events_of_kind,
    prefect_client,
    processes,
    read_side_effects,
    runnable_or_running,
    stage_rows,
    start_prefect_server,
)
from tracking import Tracker, connect

ITEMS = 2000
WORKERS = 3
POOL = "proof-pool"
DEPLOYMENT = "proof"
BATCH = {"granularity": "batch", "batch_size": 50, "concurrency": 4}
STAGE = {"granularity": "stage", "batch_size": 25, "concurrency": 4}
RUNS_TIMEOUT = 150
FINAL_TYPES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _postgres() -> str:
    url = os.environ.get("TRACKING_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("TRACKING_TEST_POSTGRES_URL is not set")
    return url


def _deploy(api_url: str) -> str:
    """The process work pool, and the resume deployment of PROOF on it; entrypoint and job
    variables are the repository's prefect.yaml's (a module path: workers import the
    project; nothing is pulled)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    from tracking.flows import resume_flow

    (entry,) = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][:1]
    with prefect_client(api_url) as client:
        client.create_work_pool(WorkPoolCreate(
            name=POOL, type="process",
            base_job_template=ProcessWorker.get_default_base_job_template(),
        ))
        flow_id = client.create_flow_from_name(resume_flow.name)
        client.create_deployment(
            flow_id=flow_id, name=DEPLOYMENT, entrypoint=entry["entrypoint"],
            work_pool_name=POOL, work_queue_name="default",
            parameters={"process": proof.code},
            parameter_openapi_schema=resume_flow.parameters.model_dump(mode="json"),
            enforce_parameter_schema=True, job_variables=entry.get("job_variables") or {},
        )
    return f"{resume_flow.name}/{DEPLOYMENT}"


def _wait_for_workers(api_url: str, procs, names: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with prefect_client(api_url) as client:
            online = {w.name for w in client.read_workers_for_work_pool(POOL)
                      if str(w.status.value if hasattr(w.status, "value") else w.status)
                      == "ONLINE"}
        if set(names) <= online:
            return
        for name, proc in procs.started:
            if name in names and proc.poll() is not None:
                raise AssertionError(f"worker {name} exited:\n{procs.tail(name)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not online after {timeout}s: {online}")
        time.sleep(1)


def _start_runs(api_url: str, name: str, parameter_sets: list[dict]) -> list[str]:
    from prefect.deployments import run_deployment

    ids = []
    with prefect_client(api_url):
        for params in parameter_sets:
            run = run_deployment(name, parameters={"process": proof.code, **params},
                                 timeout=0, as_subflow=False)
            ids.append(str(run.id))
    return ids


def _wait_for_runs(api_url: str, ids: list[str], procs, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        with prefect_client(api_url) as client:
            runs = {i: client.read_flow_run(i) for i in ids}
        if all(r.state and r.state.type.value in FINAL_TYPES for r in runs.values()):
            return runs
        if time.monotonic() > deadline:
            states = {i: (r.state.name if r.state else None) for i, r in runs.items()}
            logs = "\n".join(procs.tail(n, 1500) for n, _ in procs.started if "worker" in n)
            raise AssertionError(f"flow runs not finished after {timeout}s: {states}\n{logs}")
        time.sleep(1)


def _submitted(log: str, worker: str) -> list[str]:
    """The flow runs a worker ran (its log: submitted, and not aborted because another
    worker got it first)."""
    tried = re.findall(rf"Worker '{worker}' submitting flow run '([0-9a-f-]+)'", log)
    aborted = set(re.findall(r"Aborted submission of flow run '([0-9a-f-]+)'", log))
    return [i for i in tried if i not in aborted]


def _overlap(runs: dict[str, object]) -> float:
    """Seconds during which all the runs were running at once (<= 0: they were not)."""
    starts = [r.start_time for r in runs.values()]
    ends = [r.end_time for r in runs.values()]
    return (min(ends) - max(starts)).total_seconds()


@pytest.mark.slow
@pytest.mark.postgres
def test_three_process_workers_with_overlapping_runs_record_every_attempt_once(tmp_path):
    server = _postgres()
    side_effects = tmp_path / "side-effects.log"
    t_start = time.monotonic()
    with (
        fresh_database(server, "proof_prefect") as prefect_db,
        fresh_database(server, "proof_tracking") as tracking_url,
        processes(tmp_path / "logs") as procs,
    ):
        api_url = start_prefect_server(procs, tmp_path / "prefect-home", asyncpg_url(prefect_db))
        t_server = time.monotonic()

        tracker = Tracker(connect(tracking_url, migrate=True), processes=[proof])
        for start in range(0, ITEMS, 1000):
            assert all(r.is_new for r in tracker.start_many(proof.code, proof_items(start, 1000)))
        tracker.engine.dispose()

        name = _deploy(api_url)
        # What a worker machine needs (the README's worker set-up): the tracking database,
        # the processes, the project importable, the Prefect API.
        worker_env = base_env(
            TRACKING_DATABASE_URL=tracking_url,
            TRACKING_PROCESSES="tests.proof_processes:processes",
            PREFECT_API_URL=api_url,
            PREFECT_WORKER_QUERY_SECONDS="1",
            PREFECT_WORKER_PREFETCH_SECONDS="1",
            PREFECT_LOGGING_LEVEL="INFO",
        )
        worker_env["TRACKING_PROOF_SIDE_EFFECTS"] = str(side_effects)
        names = [f"proof-worker-{i}" for i in range(1, WORKERS + 1)]
        for worker in names:
            env = {**worker_env, "PREFECT_HOME": str(tmp_path / f"home-{worker}")}
            procs.start(worker, [str(BIN / "prefect"), "worker", "start", "--pool", POOL,
                                 "--type", "process", "--name", worker, "--limit", "2"], env)
        _wait_for_workers(api_url, procs, names)
        t_workers = time.monotonic()

        first = _start_runs(api_url, name, [BATCH, STAGE, BATCH, STAGE, BATCH])
        first_runs = _wait_for_runs(api_url, first, procs, RUNS_TIMEOUT)
        t_first = time.monotonic()

        engine = engine_for(tracking_url)
        later: list[str] = []
        for _ in range(8):  # system errors are due again at once (delay 0): more runs
            left = runnable_or_running(engine, proof.code)
            if not left:
                break
            assert "IN_PROGRESS" not in left, f"stages left claimed after the runs ended: {left}"
            ids = _start_runs(api_url, name, [BATCH, BATCH])
            _wait_for_runs(api_url, ids, procs, 90)
            later += ids
        t_end = time.monotonic()
        with prefect_client(api_url) as client:
            all_runs = {i: client.read_flow_run(i) for i in first + later}
        submitted = {w: _submitted(procs.log_path(w).read_text(errors="replace"), w)
                     for w in names}
        by_worker = {w: [i for i in first if i in ids] for w, ids in submitted.items()}

        effects = read_side_effects(side_effects)
        attempts = events_of_kind(engine, "ATTEMPT")
        lost = events_of_kind(engine, "LEASE_EXPIRED")
        rows = stage_rows(engine)
        problems = audit_problems(engine)
        left = runnable_or_running(engine, proof.code)
        with engine.connect() as conn:
            keys = dict(conn.exec_driver_sql("SELECT uuid, business_key FROM tx_process").all())
            per_run = dict(conn.exec_driver_sql(
                "SELECT actor, count(*) FROM tx_event WHERE kind = 'ATTEMPT' GROUP BY actor"
            ).all())
        engine.dispose()

    print(f"\nproof workers: {ITEMS} items, {len(effects)} side effects, {len(attempts)} "
          f"ATTEMPT events, {len(lost)} LEASE_EXPIRED; runs {len(first)} + {len(later)}; "
          f"server {t_server - t_start:.1f}s, workers {t_workers - t_server:.1f}s, "
          f"5 runs {t_first - t_workers:.1f}s, later runs {t_end - t_first:.1f}s; "
          f"all five overlapped {_overlap(first_runs):.1f}s; "
          f"first runs per worker {[len(v) for v in by_worker.values()]}; "
          f"attempts per first run {[per_run.get(i, 0) for i in first]}; "
          f"flow-run processes {len({pid for _, pid in effects})}")
    assert procs.leftovers() == [], "worker or flow-run processes survived the test"

    # Every flow run did its job.
    failed = {i: (r.state.name, r.state.message) for i, r in all_runs.items()
              if r.state.type.value != "COMPLETED"}
    assert not failed, failed
    # The five runs really ran at the same time, on more than one worker.
    assert _overlap(first_runs) > 0, "the five runs did not overlap"
    assert sorted(i for ids in by_worker.values() for i in ids) == sorted(first), submitted
    assert sum(1 for ids in by_worker.values() if ids) >= 2, by_worker
    assert sum(1 for i in first if per_run.get(i)) >= 3, "fewer than three runs did work"
    assert not left, f"work left: {left}"

    # One to one: each side effect has its ATTEMPT event and each event its side effect.
    effect_keys = [a for a, _ in effects]
    assert not duplicates(attempts), f"attempts recorded twice: {duplicates(attempts)}"
    assert not duplicates(effect_keys), f"stages executed twice: {duplicates(effect_keys)}"
    unrecorded = set(effect_keys) - set(attempts)
    without_effect = set(attempts) - set(effect_keys)
    assert not unrecorded, f"{len(unrecorded)} side effects without an ATTEMPT event"
    assert not without_effect, f"{len(without_effect)} ATTEMPT events without a side effect"
    assert lost == [], f"{len(lost)} leases expired although no run died"
    assert problems == [], problems[:20]

    # The final picture is the one the outcome pattern implies, item by item.
    by_tx: dict[str, dict[str, object]] = {}
    for r in rows:
        by_tx.setdefault(r.uuid, {"tx": r.tx_state})[r.platform] = (r.state, r.attempt)
    wrong = []
    for uuid, got in by_tx.items():
        want = expected(int(keys[uuid][1:]))
        if got["tx"] != want.tx_state or any(got[p] != want.stages[p] for p in PLATFORMS):
            wrong.append((keys[uuid], got, want))
    assert len(by_tx) == ITEMS
    assert not wrong, f"{len(wrong)} items differ from the pattern, e.g. {wrong[:3]}"
    states = Counter(expected(n).tx_state for n in range(ITEMS))
    assert states["REJECTED"] and states["EXHAUSTED"] and states["COMPLETED"]


def test_the_pattern_is_what_a_single_worker_produces(tmp_path):
    """The oracle of the proof above, checked against one worker on its own: run after run,
    each claiming every runnable stage and executing it through the tracking decorator
    (what a batch task run does, without Prefect), until a run finds nothing to do."""
    from tracking.decorator import Claim, TxContext, tracked_task

    engine = connect(f"sqlite:///{tmp_path / 'one.db'}", migrate=True)
    tracker = Tracker(engine, processes=[proof])
    tracker.start_many(proof.code, proof_items(0, 400))
    tasks = {p.code: tracked_task(proof, p) for p in proof.platforms}
    for run in range(10):
        claim = Claim(tracker, f"run-{run}", 1800)
        done = 0
        for platform in proof.platforms:
            while stages := tracker.claim(proof.code, platform.code, owner=claim.owner,
                                          limit=200):
                for stage in stages:
                    tasks[platform.code].fn(TxContext.of(stage, claim))
                done += len(stages)
        if not done:
            break
    assert run >= 3  # retries took later runs
    rows = stage_rows(tracker.engine)
    keys = {r.uuid: tracker.get_transaction(r.uuid).business_key for r in rows if r.seq == 1}
    by_tx: dict[str, dict[str, object]] = {}
    for r in rows:
        by_tx.setdefault(r.uuid, {"tx": r.tx_state})[r.platform] = (r.state, r.attempt)
    assert len(by_tx) == 400
    for uuid, got in by_tx.items():
        want = expected(int(keys[uuid][1:]))
        assert (got["tx"], {p: got[p] for p in PLATFORMS}) == (want.tx_state, want.stages), \
            keys[uuid]
    assert audit_problems(tracker.engine) == []
