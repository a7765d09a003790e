"""Benchmark of the Prefect layer: a tracked task run vs the same bare Prefect task run.

Against a local Prefect server that the script starts itself (``prefect server start`` on a
free port, ``PREFECT_HOME`` in a temporary directory; stopped at the end, also on errors), the
script measures, with a process of one no-op platform (``bench/bench_processes.py``):

* bare: a plain ``@task`` no-op with the options of the tracked task that matter for cost
  (no tags, ``cache_policy=NO_CACHE``, ``persist_result=False``), run ``--stages`` times
  (default 1,000) inside a ``@flow``, submitted (``.submit``, then wait) to the flow's
  ``ThreadPoolTaskRunner`` as the resume flow submits its task runs: sequentially
  (``max_workers=1``) and concurrently (``max_workers=--concurrency``);
* tracked: ``--stages`` fresh items taken in (``Tracker.start_many``), then
  ``resume_flow(granularity="stage")`` with ``concurrency=1`` (sequential) and
  ``concurrency=--concurrency`` (concurrent).

Per-task cost = wall time of the flow call / number of task runs (flow-run creation,
claims, artifacts and all included). Each measurement runs ``--repeats`` times, bare and
tracked interleaved, after a warm-up flow of each kind; the table shows the best and the
median. Between measurements the script waits until the server has recorded every task run
of the last flow (Prefect records task runs from events, in the background), so one
measurement does not pay for the previous one.

Server stalls: a task run with tags asks the server for concurrency slots (Prefect caches a
"no limits" answer for 5 s), and while the server writes a backlog of task-run events (its
task-run recorder; on SQLite this holds the writer and the event loop for many seconds on a
small machine) that call, and so the whole flow, waits. Such pauses hit bare and tracked
runs alike but at random, so next to the wall time the table shows the cost without them:
``(wall - excess of the pauses longer than --stall-threshold) / task runs``, from the times
at which task runs finish. ``--prefect-database-url postgresql://...`` runs the Prefect
server on PostgreSQL (a ``prefect_bench_<random>`` database, dropped afterwards), which
mostly avoids the stalls.

Then batch granularity: ``--batch-items`` fresh items (default 100,000) of a process with
three idempotent no-op platforms (so 3 stages each) through
``resume_flow(granularity="batch", batch_size=--batch-size)`` with concurrency 4 (one run
takes every stage from A to C): stages per second, intake not included, best and median of
``--batch-repeats`` runs (default 3: one 30-second run moves by ±10% on a shared machine,
which is the target's margin). The runs send no Prefect events
(``TRACKING_SEND_EVENTS=false``) unless ``--send-events``: sending the outcomes is a
separate step at the end of a run, not the cost of running stages.

Targets (the issue): tracked/bare <= 1.25 per task run; batch granularity >= 10,000 stages/s
on SQLite, >= 3,000 on PostgreSQL.

``--profile`` (automatic when a target is missed, unless ``--no-profile``) adds one extra
sequential run of each kind with the tracking calls timed, then under cProfile (the flow's
thread and the task runner's threads), and prints where the tracked task's extra time goes;
likewise for a batch run. The ``.pstats`` files go to ``bench/results/``.

Usage:
    .venv/bin/python bench/bench_prefect.py
    .venv/bin/python bench/bench_prefect.py --quick                  # smoke run
    .venv/bin/python bench/bench_prefect.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/bench_prefect.py --repeats 5 \\
        --prefect-database-url postgresql://postgres@127.0.0.1:5432/test   # steadier figures

With ``--database-url postgresql://...`` the script creates a database of its own
(``bench_<random>``) on that server and drops it afterwards. Results are printed as a table
and written as JSON to ``bench/results/prefect.json`` (``prefect-tracking-postgresql.json``,
``prefect-server-postgresql.json`` or both suffixes for the other set-ups). Prefect's own
logs go to ``bench/results/prefect-run.log`` (the client) and ``prefect-server.log``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import platform as platform_mod
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid as uuid_lib
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROCESS = "BENCH_NOOP"
BATCH_PROCESS = "BENCH_BATCH"
BATCH_PLATFORMS = ("A", "B", "C")
PROCESSES_PATH = "bench.bench_processes:processes"
TARGET_RATIO = 1.25
TARGET_BATCH_PER_S = {"sqlite": 10_000, "postgresql": 3_000}
SERVER_START_TIMEOUT = 180
CATCH_UP_TIMEOUT = 300


_progress: io.TextIOBase | None = None  # the terminal's stderr while fd 2 goes to a file


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=_progress or sys.stderr, flush=True)


# -- the Prefect server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def prefect_server(
    workdir: Path, log_path: Path, database_url: str | None = None
) -> Iterator[str]:
    """A local Prefect server of our own; yields its API URL and always stops it.

    Its database is SQLite in ``PREFECT_HOME`` unless ``database_url`` (SQLAlchemy async URL)
    is given."""
    port = free_port()
    home = workdir / "prefect-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    prefect_cli = Path(sys.executable).parent / "prefect"
    command = [str(prefect_cli), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}/api"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as a whole below
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _healthy(url):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the Prefect server exited ({proc.returncode}):\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start in {SERVER_START_TIMEOUT}s")
            time.sleep(0.5)
        log(f"Prefect server up at {url} (pid {proc.pid}, log {log_path})")
        yield url
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group of the server we started (pgid == its pid)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            log(f"Prefect server stopped (pid {proc.pid})")
            return
        except subprocess.TimeoutExpired:
            continue


# -- the tracking database ---------------------------------------------------------------------


@contextmanager
def postgres_database(base_url: str, prefix: str) -> Iterator[str]:
    """A database of our own (``<prefix>_<random>``) on the PostgreSQL server of
    ``base_url``, dropped afterwards; yields its URL (psycopg driver)."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from tracking.db import normalise_url

    server = make_url(normalise_url(base_url))
    if server.get_backend_name() != "postgresql":
        raise SystemExit(f"not a PostgreSQL URL: {base_url!r}")
    name = f"{prefix}_{uuid_lib.uuid4().hex[:10]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    log(f"created PostgreSQL database {name}")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        log(f"dropped PostgreSQL database {name}")


@contextmanager
def tracking_database(base_url: str | None, workdir: Path) -> Iterator[str]:
    """A fresh tracking database: a SQLite file in ``workdir``, or ``bench_<random>`` on the
    PostgreSQL server of ``base_url`` (dropped afterwards)."""
    if base_url is None:
        yield f"sqlite:///{workdir / 'tracking-bench.db'}"
        return
    from sqlalchemy.engine import make_url

    if make_url(base_url).get_backend_name() == "sqlite":
        path = Path(make_url(base_url).database or "")
        if path.exists():
            raise SystemExit(f"{path} exists: give the path of a new SQLite file")
        yield base_url
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    with postgres_database(base_url, "bench") as url:
        yield url


@contextmanager
def prefect_database(base_url: str | None) -> Iterator[str | None]:
    """The Prefect server's database: None (SQLite in PREFECT_HOME), or
    ``prefect_bench_<random>`` on the PostgreSQL server of ``base_url`` (asyncpg URL)."""
    if base_url is None:
        yield None
        return
    from sqlalchemy.engine import make_url

    with postgres_database(base_url, "prefect_bench") as url:
        yield make_url(url).set(drivername="postgresql+asyncpg").render_as_string(
            hide_password=False
        )


# -- the flows ---------------------------------------------------------------------------------


class Completions(logging.Handler):
    """When task runs finish (Prefect logs "Finished in state ..." for each), to find stalls:
    pauses in which no task run finishes because the client waits for the server."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("Finished in state") if isinstance(record.msg, str) else False:
            self.times.append(record.created)

    def stalls(self, start: float, end: float, threshold: float) -> dict[str, Any]:
        """Gaps between task-run completions (and the flow's start and end) longer than
        ``threshold``; ``excess_seconds`` is what they took beyond the median gap."""
        points = [start, *sorted(t for t in self.times if start <= t <= end), end]
        gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
        typical = statistics.median(gaps) if gaps else 0.0
        long = [g for g in gaps if g > threshold]
        return {
            "completions": len(points) - 2,
            "count": len(long),
            "seconds": sum(long),
            "excess_seconds": sum(g - typical for g in long),
            "longest_seconds": max(long, default=0.0),
        }




class Bench:
    """The flows under test, the tracker that feeds them, and the measurements."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        from prefect import flow, task
        from prefect.cache_policies import NO_CACHE
        from prefect.futures import wait
        from prefect.task_runners import ThreadPoolTaskRunner

        from bench.bench_processes import batch_process, process
        from tracking import Tracker, connect
        from tracking.flows import resume_flow

        self.url = url
        self.args = args
        self.engine = connect(url, migrate=True)
        self.tracker = Tracker(self.engine, processes=[process, batch_process])
        self.resume_flow = resume_flow
        self.next_id = 0
        self.ThreadPoolTaskRunner = ThreadPoolTaskRunner

        @task(
            name=f"{PROCESS}.bare",
            cache_policy=NO_CACHE,
            persist_result=False,
        )
        def bare_noop(i: int) -> int:
            return 0

        @flow(name="bench-bare", flow_run_name="bare x{n}")
        def bare_flow(n: int) -> int:
            # Submitted to the flow's task runner at either concurrency, as the resume
            # flow submits its task runs (a call in the flow's own thread would spare the
            # bare side the hand-over to a worker thread that the tracked side pays).
            futures = [bare_noop.submit(i) for i in range(n)]
            wait(futures)
            return sum(1 for f in futures if f.result() == 0)

        self.bare_flow = bare_flow
        self.completions = Completions()
        logging.getLogger("prefect.task_runs").addHandler(self.completions)

    # -- one run of each kind --------------------------------------------------------------

    def intake(self, n: int, process: str = PROCESS) -> None:
        for lo in range(0, n, 1000):
            items = [
                {"id": f"B{i:09d}", "customer": f"C{i % 997:04d}", "amount": i % 5000}
                for i in range(self.next_id + lo, self.next_id + min(n, lo + 1000))
            ]
            results = self.tracker.start_many(process, items, source="bench")
            assert all(r.is_new for r in results)
        self.next_id += n

    def run_bare(self, n: int, concurrency: int) -> dict[str, Any]:
        flow_ = self.bare_flow.with_options(
            task_runner=self.ThreadPoolTaskRunner(max_workers=concurrency)
        )
        self.completions.times.clear()
        t0, w0 = time.perf_counter(), time.time()
        state = flow_(n=n, return_state=True)
        wall = time.perf_counter() - t0
        stalls = self.completions.stalls(w0, time.time(), self.args.stall_threshold)
        assert state.result() == n, state
        flow_run_id = str(state.state_details.flow_run_id)
        return self._measured("bare", n, concurrency, wall, flow_run_id, stalls=stalls)

    def run_tracked(
        self, n: int, concurrency: int, granularity: str = "stage", batch_size: int = 100
    ) -> dict[str, Any]:
        """One resume run over ``n`` fresh items: of the one-platform process in stage
        granularity, of the three-platform idempotent process in batch granularity."""
        batched = granularity == "batch"
        process = BATCH_PROCESS if batched else PROCESS
        platforms = BATCH_PLATFORMS if batched else ("NOOP",)
        self.intake(n, process)
        self.completions.times.clear()
        t0, w0 = time.perf_counter(), time.time()
        from tracking.settings import use_database

        with use_database(self.url):  # not a flow parameter
            summary = self.resume_flow(
                process=process, granularity=granularity, batch_size=batch_size,
                concurrency=concurrency,
            )
        wall = time.perf_counter() - t0
        stalls = None if batched else self.completions.stalls(
            w0, time.time(), self.args.stall_threshold)
        stages = n * len(platforms)
        done = {p: summary["by_platform"].get(p, {}) for p in platforms}
        if summary["stages_run"] != stages or any(d != {"COMPLETED": n} for d in done.values()):
            raise RuntimeError(f"the resume run did not complete {stages} stages: {summary}")
        expected = n if not batched else len(platforms) * -(-n // batch_size)
        return self._measured(
            f"tracked-{granularity}", stages, concurrency, wall, summary["flow_run_id"],
            task_runs=expected, stalls=stalls,
        )

    def _measured(
        self, kind: str, n: int, concurrency: int, wall: float, flow_run_id: str,
        task_runs: int | None = None, stalls: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        catch_up = self.wait_for_server(flow_run_id, n if task_runs is None else task_runs)
        run = {
            "kind": kind, "stages": n, "concurrency": concurrency, "seconds": wall,
            "ms_per_stage": 1000 * wall / n, "stages_per_s": n / wall,
            "flow_run_id": flow_run_id, "server_catch_up_seconds": catch_up,
        }
        if stalls is not None:
            run["stalls"] = stalls
            run["stall_free_ms_per_stage"] = 1000 * (wall - stalls["excess_seconds"]) / n
        return run

    def wait_for_server(self, flow_run_id: str, expected: int) -> float:
        """Wait until the server has recorded every task run of the flow run as completed
        (it does so from events, after the flow call has returned)."""
        import httpx

        t0 = time.perf_counter()
        body = {
            "flow_runs": {"id": {"any_": [flow_run_id]}},
            "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        }
        count = 0
        with httpx.Client(base_url=os.environ["PREFECT_API_URL"], timeout=30) as client:
            while time.perf_counter() - t0 < CATCH_UP_TIMEOUT:
                response = client.post("/task_runs/count", json=body)
                response.raise_for_status()
                count = response.json()
                if count >= expected:
                    break
                time.sleep(0.25)
            else:
                log(f"  warning: the server recorded only {count}/{expected} task runs")
        time.sleep(self.args.settle)
        return time.perf_counter() - t0


# -- profiling ---------------------------------------------------------------------------------


class ThreadProfiles:
    """cProfile in the calling thread and in the task runners' threads started while it is
    active (not in Prefect's long-lived threads: a profiler left enabled there stops later
    profilers of the main thread from recording)."""

    def __init__(self) -> None:
        self.main = cProfile.Profile()
        self.threads: list[tuple[str, cProfile.Profile]] = []
        self._lock = threading.Lock()

    def _hook(self, *_: Any) -> None:
        sys.setprofile(None)
        if not threading.current_thread().name.startswith("ThreadPoolExecutor"):
            return
        prof = cProfile.Profile()
        with self._lock:
            self.threads.append((threading.current_thread().name, prof))
        prof.enable()

    def __enter__(self) -> ThreadProfiles:
        threading.setprofile(self._hook)
        self.main.enable()
        return self

    def __exit__(self, *_: Any) -> None:
        self.main.disable()
        threading.setprofile(None)

    def stats(self, which: str) -> pstats.Stats | None:
        """``main`` or ``workers`` (the task runner's threads)."""
        if which == "main":
            return pstats.Stats(self.main)
        chosen = [p for name, p in self.threads if "ThreadPoolExecutor" in name]
        if not chosen:
            return None
        stats = pstats.Stats(chosen[0])
        for prof in chosen[1:]:
            stats.add(prof)
        return stats


def _top(stats: pstats.Stats, sort: str, limit: int) -> str:
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    text = buf.getvalue()
    start = text.find("   ncalls")
    return text[start:] if start >= 0 else text


class CallTimer:
    """Wall time spent in selected functions (patched for one run only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.seconds[label] += dt
                    self.calls[label] += 1

        setattr(owner, attr, timed)
        self._undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def _tracking_timer() -> CallTimer:
    import tracking.decorator as decorator
    import tracking.flows as runner
    from tracking.store import Tracker

    timer = CallTimer()
    for owner, attr, label in (
        (Tracker, "complete_stage", "Tracker.complete_stage (in the task)"),
        (Tracker, "start_attempt", "Tracker.start_attempt (in the task)"),
        (Tracker, "start_attempts", "Tracker.start_attempts (in the batch task)"),
        (Tracker, "complete_batch", "Tracker.complete_batch (in the batch task)"),
        (decorator, "get_run_logger", "get_run_logger (in the task)"),
        (decorator, "_call", "the platform function (no-op)"),
        (Tracker, "claim", "Tracker.claim (flow)"),
        (Tracker, "reserve", "Tracker.reserve (flow, batch granularity)"),
        (Tracker, "get_stages", "Tracker.get_stages / settle (flow)"),
        (Tracker, "recover_expired_leases", "Tracker.recover_expired_leases (flow + claims)"),
        (runner, "update_progress_artifact", "update_progress_artifact (flow, per claim)"),
        (runner, "create_progress_artifact", "create_progress_artifact (flow, once)"),
        (runner, "publish_summary", "summary artifacts (flow, once)"),
        (runner, "connect", "tracking.connect (flow, once)"),
    ):
        timer.wrap(owner, attr, label)
    return timer


def _breakdown(timer: CallTimer, n: int) -> dict[str, Any]:
    return {
        label: {"ms_per_stage": 1000 * s / n, "calls": timer.calls[label]}
        for label, s in timer.seconds.items()
    }


def profile_batch(bench: Bench, n: int, batch_size: int) -> dict[str, Any]:
    """Where a batch-granularity stage spends its time (concurrency 1)."""
    out: dict[str, Any] = {}
    timer = _tracking_timer()
    try:
        out["timed_run"] = bench.run_tracked(n, 1, granularity="batch", batch_size=batch_size)
    finally:
        timer.restore()
    out["breakdown_ms_per_stage"] = _breakdown(timer, n * len(BATCH_PLATFORMS))
    with ThreadProfiles() as profiles:
        out["profiled_run"] = bench.run_tracked(
            n, 1, granularity="batch", batch_size=batch_size
        )
    profiles.stats("main").dump_stats(RESULTS_DIR / "prefect-profile-batch-flow.pstats")
    stats = profiles.stats("workers")
    if stats is not None:
        stats.dump_stats(RESULTS_DIR / "prefect-profile-batch-tasks.pstats")
        out["tasks_top_cumulative"] = _top(stats, "cumulative", 40)
        out["tasks_top_tottime"] = _top(stats, "tottime", 25)
    return out


def profile_sequential(bench: Bench, n: int) -> dict[str, Any]:
    """Where a tracked sequential stage spends the time the bare task does not."""
    out: dict[str, Any] = {}
    # 1. Time the tracking calls of one tracked run (each call, any thread).
    timer = _tracking_timer()
    try:
        timed = bench.run_tracked(n, 1)
    finally:
        timer.restore()
    out["timed_run"] = timed
    out["breakdown_ms_per_stage"] = _breakdown(timer, n)
    # 2. cProfile, every thread: one bare and one tracked sequential run.
    for kind in ("bare", "tracked"):
        with ThreadProfiles() as profiles:
            run = bench.run_bare(n, 1) if kind == "bare" else bench.run_tracked(n, 1)
        out[f"{kind}_profiled_run"] = run
        # Both kinds run their task runs in the flow's task-runner thread.
        main = profiles.stats("main")
        stats = profiles.stats("workers")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        if stats is not None:
            stats.dump_stats(RESULTS_DIR / f"prefect-profile-{kind}-tasks.pstats")
            out[f"{kind}_tasks_top_cumulative"] = _top(stats, "cumulative", 45)
            out[f"{kind}_tasks_top_tottime"] = _top(stats, "tottime", 25)
        if kind == "tracked" and main is not None:
            main.dump_stats(RESULTS_DIR / "prefect-profile-tracked-flow.pstats")
            out["tracked_flow_top_cumulative"] = _top(main, "cumulative", 35)
    return out


# -- the benchmark -----------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [r["ms_per_stage"] for r in runs]
    rates = [r["stages_per_s"] for r in runs]
    out = {
        "runs": len(runs),
        "best_ms": min(ms),
        "median_ms": statistics.median(ms),
        "all_ms": ms,
        "best_per_s": max(rates),
        "median_per_s": statistics.median(rates),
    }
    if all("stall_free_ms_per_stage" in r for r in runs):
        free = [r["stall_free_ms_per_stage"] for r in runs]
        out.update(
            stall_free_best_ms=min(free),
            stall_free_median_ms=statistics.median(free),
            stall_free_all_ms=free,
            stall_seconds=[r["stalls"]["seconds"] for r in runs],
            stall_counts=[r["stalls"]["count"] for r in runs],
        )
    return out


def run_benchmark(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    n, conc = args.stages, args.concurrency
    log("warm-up: one small flow of each kind")
    bench.run_bare(20, 1)
    bench.run_bare(20, conc)
    bench.run_tracked(20, 1)
    bench.run_tracked(20, conc)
    bench.run_tracked(50, 1, granularity="batch", batch_size=25)

    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in range(1, 0 if args.batch_only else args.repeats + 1):
        for mode, c in (("sequential", 1), ("concurrent", conc)):
            for kind in ("bare", "tracked"):
                run = bench.run_bare(n, c) if kind == "bare" else bench.run_tracked(n, c)
                runs[f"{kind}-{mode}"].append(run)
                st = run["stalls"]
                log(f"  repeat {r} {kind:7s} {mode:10s}: {run['ms_per_stage']:.2f} ms/stage "
                    f"({run['seconds']:.1f}s; {st['count']} stalls, {st['seconds']:.1f}s; "
                    f"stall-free {run['stall_free_ms_per_stage']:.2f} ms/stage; server caught "
                    f"up in {run['server_catch_up_seconds']:.1f}s)")

    per_task: dict[str, Any] = {}
    for mode in () if args.batch_only else ("sequential", "concurrent"):
        bare = summarize(runs[f"bare-{mode}"])
        tracked = summarize(runs[f"tracked-{mode}"])
        paired = [
            t["ms_per_stage"] / b["ms_per_stage"]
            for b, t in zip(runs[f"bare-{mode}"], runs[f"tracked-{mode}"], strict=True)
        ]
        per_task[mode] = {
            "concurrency": 1 if mode == "sequential" else conc,
            "bare": bare,
            "tracked": tracked,
            "ratio_best": tracked["best_ms"] / bare["best_ms"],
            "ratio_median": tracked["median_ms"] / bare["median_ms"],
            "ratio_paired": paired,
            "extra_ms_best": tracked["best_ms"] - bare["best_ms"],
            "stall_free_ratio_best": tracked["stall_free_best_ms"] / bare["stall_free_best_ms"],
            "stall_free_ratio_median": (
                tracked["stall_free_median_ms"] / bare["stall_free_median_ms"]
            ),
            "stall_free_extra_ms_best": (
                tracked["stall_free_best_ms"] - bare["stall_free_best_ms"]
            ),
        }

    batch: dict[str, Any] = {}
    for c in args.batch_concurrency:
        batch_runs = []
        for r in range(1, args.batch_repeats + 1):
            run = bench.run_tracked(args.batch_items, c, granularity="batch",
                                    batch_size=args.batch_size)
            batch_runs.append(run)
            log(f"  repeat {r} batch concurrency {c}: {run['stages_per_s']:,.0f} stages/s "
                f"({run['seconds']:.1f}s for {args.batch_items:,})")
        batch[str(c)] = {"concurrency": c, **summarize(batch_runs)}
    return {"per_task": per_task, "batch": batch, "runs": dict(runs),
            "dialect": bench.engine.dialect.name}


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    targets = []
    for mode, r in result["per_task"].items():
        targets.append({
            "kind": "ratio",
            "name": f"tracked/bare <= {TARGET_RATIO} per task run, {mode} "
                    f"(concurrency {r['concurrency']})",
            "met": r["ratio_best"] <= TARGET_RATIO,
            "value": r["ratio_best"],
            "detail": f"best {r['tracked']['best_ms']:.2f} / {r['bare']['best_ms']:.2f} ms = "
                      f"{r['ratio_best']:.2f}x (median {r['ratio_median']:.2f}x)",
        })
        targets.append({
            "kind": "ratio-stall-free",
            "name": f"  same, without server stalls, {mode}",
            "met": r["stall_free_ratio_best"] <= TARGET_RATIO,
            "value": r["stall_free_ratio_best"],
            "detail": f"best {r['tracked']['stall_free_best_ms']:.2f} / "
                      f"{r['bare']['stall_free_best_ms']:.2f} ms = "
                      f"{r['stall_free_ratio_best']:.2f}x "
                      f"(median {r['stall_free_ratio_median']:.2f}x)",
        })
    target = TARGET_BATCH_PER_S[result["dialect"]]
    for c, r in result["batch"].items():
        targets.append({
            "kind": "batch",
            "name": f"batch granularity >= {target:,} stages/s on {result['dialect']} "
                    f"(concurrency {c})",
            "met": r["best_per_s"] >= target,
            "value": r["best_per_s"],
            "detail": f"best {r['best_per_s']:,.0f}/s (median {r['median_per_s']:,.0f}/s)",
        })
    return targets


def render(result: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"Prefect layer benchmark: Prefect {meta['prefect']} (server database: "
        f"{meta['prefect_server_database']}), tracking on {meta['database']} "
        f"({meta['database_version']}), {meta['cpus']} CPUs, Python {meta['python']}",
        "",
        f"Per task run: flow wall time / {meta['stages']:,} task runs, best (median) of "
        f"{meta['repeats']} runs",
        "",
        f"{'':30s}{'bare ms/task':>16s}{'tracked ms/stage':>20s}{'extra ms':>10s}"
        f"{'ratio best':>12s}{'ratio median':>14s}",
    ]
    for mode, r in result["per_task"].items():
        for prefix, label in (("", f"{mode} (concurrency {r['concurrency']})"),
                              ("stall_free_", "  without server stalls")):
            b, t = r["bare"], r["tracked"]
            bare = f"{b[prefix + 'best_ms']:.2f} ({b[prefix + 'median_ms']:.2f})"
            tracked = f"{t[prefix + 'best_ms']:.2f} ({t[prefix + 'median_ms']:.2f})"
            lines.append(
                f"{label:30s}{bare:>16s}{tracked:>20s}{r[prefix + 'extra_ms_best']:>10.2f}"
                f"{r[prefix + 'ratio_best']:>11.2f}x{r[prefix + 'ratio_median']:>13.2f}x"
            )
    lines += [
        "",
        f"Server stalls (pauses > {meta['stall_threshold']:g}s in which no task run finished: "
        "the client waits for the server), seconds per run:",
    ]
    for mode, r in result["per_task"].items():
        for kind in ("bare", "tracked"):
            secs = ", ".join(f"{x:.1f}" for x in r[kind]["stall_seconds"])
            lines.append(f"  {mode:10s} {kind:7s}  {secs}")
    lines += [
        "",
        f"Batch granularity: {meta['batch_items']:,} items x {len(BATCH_PLATFORMS)} idempotent "
        f"platforms = {meta['batch_items'] * len(BATCH_PLATFORMS):,} stages, "
        f"batch_size {meta['batch_size']}, "
        f"best (median) of {meta['batch_repeats']} runs",
        "",
        f"{'':24s}{'stages/s':>18s}{'ms/stage':>20s}",
    ]
    for c, r in result["batch"].items():
        rate = f"{r['best_per_s']:,.0f} ({r['median_per_s']:,.0f})"
        ms = f"{r['best_ms']:.2f} ({r['median_ms']:.2f})"
        lines.append(f"{'concurrency ' + c:24s}{rate:>18s}{ms:>20s}")
    lines += ["", "Targets:"]
    for t in meta["targets"]:
        lines.append(f"  [{'MET ' if t['met'] else 'MISS'}] {t['name']}: {t['detail']}")
    for key, title in (
        ("profile", "a tracked sequential stage (stage granularity, concurrency 1)"),
        ("profile_batch", "a stage in batch granularity (concurrency 1)"),
    ):
        profile = result.get(key)
        if not profile:
            continue
        lines += ["", f"Where {title} spends its time (timed calls, ms/stage):"]
        for label, v in sorted(profile["breakdown_ms_per_stage"].items(),
                               key=lambda kv: -kv[1]["ms_per_stage"]):
            lines.append(f"  {label:52s}{v['ms_per_stage']:>8.3f}  ({v['calls']:,} calls)")
        run = profile["timed_run"]
        lines.append(f"  {'(that run with the timers on: total)':52s}{run['ms_per_stage']:>8.3f}")
    return "\n".join(lines)


def metadata(url: str, args: argparse.Namespace) -> dict[str, Any]:
    import prefect
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                import sqlite3

                version = f"SQLite {sqlite3.sqlite_version}"
            else:
                version = "PostgreSQL " + str(conn.exec_driver_sql("SHOW server_version").scalar())
        name = engine.dialect.name
    finally:
        engine.dispose()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
        check=False,
    ).stdout.strip()
    return {
        "prefect": prefect.__version__,
        "database": name,
        "database_version": version,
        "cpus": os.cpu_count(),
        "python": platform_mod.python_version(),
        "machine": platform_mod.platform(),
        "git_commit": commit,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "prefect_server_database": "PostgreSQL" if args.prefect_database_url else "SQLite",
        "stall_threshold": args.stall_threshold,
        "stages": args.stages,
        "concurrency": args.concurrency,
        "repeats": args.repeats,
        "batch_items": args.batch_items,
        "batch_size": args.batch_size,
        "batch_concurrency": args.batch_concurrency,
        "batch_repeats": args.batch_repeats,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=1000, help="task runs per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="threads, concurrent runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--batch-items", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-concurrency", default="4",
                        help="comma-separated concurrencies of the batch runs")
    parser.add_argument("--batch-repeats", type=int, default=3,
                        help="runs of each batch measurement (each on fresh items)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to pause after the server caught up")
    parser.add_argument("--database-url", default=None,
                        help="default: a SQLite file in a temporary directory; with "
                             "postgresql://... a bench_<random> database is created and dropped")
    parser.add_argument("--prefect-database-url", default=None,
                        help="default: the Prefect server on SQLite in its PREFECT_HOME; with "
                             "postgresql://... a prefect_bench_<random> database is created on "
                             "that server for it and dropped afterwards")
    parser.add_argument("--stall-threshold", type=float, default=1.0,
                        help="a pause longer than this (s) without a finished task run is a "
                             "server stall")
    parser.add_argument("--send-events", action="store_true",
                        help="resume runs also send their outcomes as Prefect events at the "
                        "end (TRACKING_SEND_EVENTS; off by default: measured apart)")
    parser.add_argument("--batch-only", action="store_true",
                        help="measure batch granularity only (not tracked vs bare task runs)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument("--profile", action="store_true", help="always profile")
    parser.add_argument("--no-profile", action="store_true",
                        help="never profile (default: profile when the ratio target is missed)")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.stages, args.repeats = 200, 1
        args.batch_items, args.batch_repeats = 2000, 1
    args.batch_concurrency = [int(c) for c in str(args.batch_concurrency).split(",") if c]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on SIGTERM too
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="bench-prefect-") as tmp,
        prefect_database(args.prefect_database_url) as prefect_db,
    ):
        workdir = Path(tmp)
        server_log = RESULTS_DIR / "prefect-server.log"
        with prefect_server(workdir, server_log, prefect_db) as api_url:
            # The client: set before Prefect is imported (it reads its settings then).
            os.environ.update(
                PREFECT_API_URL=api_url,
                PREFECT_HOME=str(workdir / "prefect-home"),
                PREFECT_SERVER_LOGGING_LEVEL="WARNING",
                TRACKING_PROCESSES=PROCESSES_PATH,
                # Sending the business outcomes as Prefect events (the outbox, at the end
                # of a run) is not part of running stages; --send-events includes it.
                TRACKING_SEND_EVENTS="true" if args.send_events else "false",
            )
            with tracking_database(args.database_url, workdir) as url:
                os.environ["TRACKING_DATABASE_URL"] = url
                return _run(url, args)


def _drain_prefect() -> None:
    """Send the client's buffered events and logs while the server still runs."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=60)
    APILogWorker.drain_all(timeout=60)


def _without_flow_heartbeats() -> None:
    """No flow-run heartbeat thread in this process's flow runs (bare and tracked alike).

    Prefect 3.8 starts one per flow run (an event every 180 s by default) and, as the run
    ends, joins it: the thread sleeps in 1-s ticks, so every flow's wall time was rounded up
    to the next whole second from its start, a resolution of 1 ms per task run at 1,000
    task runs, too coarse for the ratios measured here. The deployments keep their heartbeats
    (``prefect.yaml``); a flow of a few seconds sends none anyway."""
    from prefect.flow_engine import BaseFlowRunEngine

    BaseFlowRunEngine.heartbeat_seconds = property(lambda self: None)  # type: ignore[assignment,method-assign]


def _run(url: str, args: argparse.Namespace) -> int:
    _without_flow_heartbeats()
    # Prefect's console logs (a line per task run, on stderr) go to a file, not the terminal;
    # this script's own progress lines still reach the terminal (see ``log``).
    run_log = RESULTS_DIR / "prefect-run.log"
    with open(run_log, "w") as out, _stderr_to(out):
        return _measure(url, args, run_log)


@contextmanager
def _stderr_to(out: io.TextIOBase) -> Iterator[None]:
    global _progress
    sys.stderr.flush()
    saved = os.dup(2)
    _progress = os.fdopen(os.dup(saved), "w")
    os.dup2(out.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        _progress.close()
        _progress = None


def _measure(url: str, args: argparse.Namespace, run_log: Path) -> int:
    bench = Bench(url, args)
    meta = metadata(url, args)
    log(f"tracking database: {meta['database']} ({meta['database_version']}); "
        f"{args.stages:,} stages x {args.repeats} repeats; Prefect logs in {run_log}")
    result = run_benchmark(bench, args)
    meta["targets"] = check_targets(result)
    missed = {t["kind"] for t in meta["targets"] if not t["met"]}
    if args.profile or ({"ratio", "ratio-stall-free"} & missed and not args.no_profile):
        log("profiling one sequential run of each kind")
        result["profile"] = profile_sequential(bench, args.stages)
    if args.profile or ("batch" in missed and not args.no_profile):
        n = min(args.batch_items, 5000)
        log(f"profiling a batch run of {n:,} stages")
        result["profile_batch"] = profile_batch(bench, n, args.batch_size)
    bench.engine.dispose()
    _drain_prefect()
    text = render(result, meta)
    print(text)
    profile = result.get("profile")
    if profile:
        for key in ("bare_tasks_top_cumulative", "tracked_tasks_top_cumulative",
                    "tracked_tasks_top_tottime", "tracked_flow_top_cumulative"):
            if key in profile:
                print(f"\n== profile: {key} ==\n{profile[key]}")
    profile = result.get("profile_batch")
    if profile:
        for key in ("tasks_top_cumulative", "tasks_top_tottime"):
            print(f"\n== batch profile: {key} ==\n{profile[key]}")
    name = "prefect"
    if meta["database"] != "sqlite":
        name += f"-tracking-{meta['database']}"
    if args.prefect_database_url:
        name += "-server-postgresql"
    output = args.output or RESULTS_DIR / f"{name}.json"
    output.write_text(json.dumps({"meta": meta, "results": result}, indent=2, default=str))
    log(f"results written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
