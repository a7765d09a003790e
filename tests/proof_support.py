"""Helpers of the standing proofs (tests/prefect/test_proof_*.py): subprocesses that are always
stopped, a Prefect server of our own, the side-effect log, and audit-trail checks.

Every subprocess is started in a session of its own (``start_new_session``) with the marker
``TRACKING_PROOF_MARKER=<random>`` in its environment. ``Processes.stop_all()`` sends
SIGTERM then SIGKILL to each process group, then SIGKILLs whatever still carries the marker
(Prefect starts flow-run processes in process groups of their own, so killing a worker's
group does not reach them). Only processes this helper started, or their descendants, carry
the marker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid as uuid_lib
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa

from tests.pg import asyncpg_url, free_port, fresh_database
from tracking.db import normalise_url

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARKER_ENV = "TRACKING_PROOF_MARKER"
SERVER_START_TIMEOUT = 180


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a proof subprocess: ours without PREFECT_* / TRACKING_* settings,
    the repository on PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "TRACKING_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Processes:
    """The subprocesses of one test; ``stop_all`` ends every one of them."""

    logs: Path
    marker: str = field(default_factory=lambda: uuid_lib.uuid4().hex)
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: Mapping[str, str],
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``command`` with its output in ``logs/<name>.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**env, MARKER_ENV: self.marker}
        with open(self.log_path(name), "ab") as out:
            proc = subprocess.Popen(
                command, env=env, cwd=cwd or ROOT, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.started.append((name, proc))
        return proc

    def run(self, name: str, command: list[str], env: Mapping[str, str],
            timeout: float, cwd: Path | None = None) -> tuple[int, str, float]:
        """Run ``command`` to its end; returns (exit code, its output, seconds)."""
        t0 = time.monotonic()
        proc = self.start(name, command, env, cwd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise AssertionError(
                f"{name} did not finish in {timeout}s:\n{self.tail(name)}"
            ) from None
        return code, self.log_path(name).read_text(errors="replace"), time.monotonic() - t0

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def tail(self, name: str, chars: int = 4000) -> str:
        try:
            return self.log_path(name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
        if proc.poll() is not None:
            _killpg(proc.pid, signal.SIGKILL)  # stragglers left in its group
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            _killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        _killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while (left := marked_pids(self.marker)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def leftovers(self) -> list[int]:
        return marked_pids(self.marker)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment holds ``TRACKING_PROOF_MARKER=<marker>``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@contextmanager
def processes(logs: Path) -> Iterator[Processes]:
    """Subprocesses that are all stopped at the end, whatever happens."""
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.stop_all()


# -- a Prefect server ---------------------------------------------------------------------------


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_prefect_server(procs: Processes, home: Path, database_url: str | None = None) -> str:
    """``prefect server start`` on a free port of 127.0.0.1 (its database: ``database_url``,
    an asyncpg URL, else SQLite in ``home``); returns the API URL once it is healthy."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        PREFECT_UI_ENABLED="false",
    )
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    name = f"prefect-server-{port}"
    proc = procs.start(name, [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                              "--port", str(port)], env)
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not _healthy(api_url):
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited ({proc.returncode}):\n"
                               f"{procs.tail(name)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Prefect server did not start in {SERVER_START_TIMEOUT}s:\n"
                               f"{procs.tail(name)}")
        time.sleep(0.5)
    return api_url


@contextmanager
def prefect_server(workdir: Path) -> Iterator[str]:
    """A Prefect server of our own for the duration of the block; its database is a fresh
    one on ``TRACKING_TEST_POSTGRES_URL`` when set (dropped afterwards), else SQLite."""
    pg = os.environ.get("TRACKING_TEST_POSTGRES_URL")
    with ExitStack() as stack:
        database = (asyncpg_url(stack.enter_context(fresh_database(pg, "proof_prefect")))
                    if pg else None)
        procs = stack.enter_context(processes(workdir / "logs"))
        yield start_prefect_server(procs, workdir / "home", database)


@contextmanager
def prefect_client(api_url: str) -> Iterator[Any]:
    """A synchronous Prefect client of the server at ``api_url`` (whatever this process's
    settings say)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


def flow_runs(api_url: str) -> list[Any]:
    """Every flow run of the server, oldest first."""
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client(api_url) as client:
        return client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_ASC)


# -- the side-effect log and the audit trail --------------------------------------------------


class Attempt(NamedTuple):
    uuid: str
    platform: str
    stage: str
    attempt: int


def read_side_effects(path: Path) -> list[tuple[Attempt, int]]:
    """The side-effect log as (attempt, pid) pairs; a malformed line fails the test."""
    if not path.exists():
        return []
    effects = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        assert len(parts) == 5, f"side-effect log line {number} is malformed: {line!r}"
        uuid, platform, stage, attempt, pid = parts
        effects.append((Attempt(uuid, platform, stage, int(attempt)), int(pid)))
    return effects


def engine_for(url: str) -> sa.Engine:
    """A plain engine (no migrations) for reading what the runs wrote."""
    return sa.create_engine(normalise_url(url))


def events_of_kind(engine: sa.Engine, kind: str) -> list[Attempt]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT uuid, platform, stage, attempt FROM tx_event WHERE kind = :k"),
            {"k": kind},
        ).all()
    return [Attempt(r.uuid, r.platform, r.stage, r.attempt) for r in rows]


def stage_rows(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT s.uuid, s.platform, s.stage, s.seq, s.state, s.attempt, s.lease_owner, "
            "s.lease_expires_at, s.next_attempt_at, t.state AS tx_state "
            "FROM tx_stage s JOIN tx_process t ON t.uuid = s.uuid ORDER BY s.uuid, s.seq"
        )).all()


def runnable_or_running(engine: sa.Engine, process: str) -> dict[str, int]:
    """Stages a later run could still pick up (due or not), and stages claimed now."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT state, count(*) AS n FROM tx_stage WHERE process_code = :p AND "
            "((state IN ('PENDING', 'TERMINATED') AND next_attempt_at IS NOT NULL) "
            "OR state = 'IN_PROGRESS') GROUP BY state"
        ), {"p": process}).all()
    return {r.state: r.n for r in rows}


def duplicates(items: list[Attempt]) -> dict[Attempt, int]:
    return {k: n for k, n in Counter(items).items() if n > 1}


def audit_problems(engine: sa.Engine) -> list[str]:
    """Where the audit trail and the stage rows disagree (empty when consistent).

    For every stage: its attempt events (ATTEMPT and LEASE_EXPIRED) are numbered 1..k with no
    gap and no repeat; the stage's attempt counter is k (or k+1 while it is IN_PROGRESS: an
    attempt started, not yet recorded); a stage that is not IN_PROGRESS is in the state its
    last event moved it to.
    """
    with engine.connect() as conn:
        events = conn.execute(sa.text(
            "SELECT uuid, platform, stage, attempt, kind, to_state FROM tx_event "
            "WHERE kind IN ('ATTEMPT', 'LEASE_EXPIRED') ORDER BY id"
        )).all()
    by_stage: dict[tuple[str, str, str], list[Any]] = {}
    for e in events:
        by_stage.setdefault((e.uuid, e.platform, e.stage), []).append(e)
    problems = []
    for s in stage_rows(engine):
        trail = by_stage.pop((s.uuid, s.platform, s.stage), [])
        numbers = [e.attempt for e in trail]
        label = f"{s.platform}.{s.stage} of {s.uuid}"
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{label}: attempt events numbered {numbers}")
        allowed = {len(numbers), len(numbers) + 1} if s.state == "IN_PROGRESS" else {len(numbers)}
        if s.attempt not in allowed:
            problems.append(f"{label}: attempt counter {s.attempt} but {len(numbers)} attempt "
                            f"events (state {s.state})")
        if s.state != "IN_PROGRESS" and trail and trail[-1].to_state != s.state:
            problems.append(f"{label}: state {s.state} but its last event moved it to "
                            f"{trail[-1].to_state}")
    for key in by_stage:
        problems.append(f"attempt events for a stage that does not exist: {key}")
    problems += _transaction_problems(engine)
    return problems


def _transaction_problems(engine: sa.Engine) -> list[str]:
    """A transaction's state must follow from its stages' states."""
    stages: dict[str, list[str]] = {}
    tx_state: dict[str, str] = {}
    for s in stage_rows(engine):
        stages.setdefault(s.uuid, []).append(s.state)
        tx_state[s.uuid] = s.tx_state
    problems = []
    for uuid, states in stages.items():
        got = tx_state[uuid]
        if "REJECTED" in states:
            want = {"REJECTED"}
        elif "EXHAUSTED" in states:
            want = {"EXHAUSTED"}
        elif all(st == "COMPLETED" for st in states):
            want = {"COMPLETED"}
        elif all(st == "PENDING" for st in states):
            want = {"PENDING"}
        else:
            want = {"IN_PROGRESS", "TERMINATED", "PENDING"}
        if got not in want:
            problems.append(f"transaction {uuid} is {got} with stages {states}")
    return problems


def run_until_done(procs: Processes, command: list[str], env: Mapping[str, str],
                   engine: sa.Engine, process: str, timeout: float,
                   name: str = "resume") -> list[tuple[int, str, float]]:
    """Run ``command`` (a resume run) again and again until no stage of ``process`` is
    runnable or claimed; waits for claimed stages' leases to expire in between. Returns each
    run's (exit code, output, seconds)."""
    deadline = time.monotonic() + timeout
    results = []
    while time.monotonic() < deadline:
        left = runnable_or_running(engine, process)
        if not left:
            return results
        if set(left) == {"IN_PROGRESS"}:
            with engine.connect() as conn:
                soonest = conn.execute(sa.text(
                    "SELECT min(lease_expires_at) FROM tx_stage WHERE state = 'IN_PROGRESS' "
                    "AND process_code = :p"), {"p": process}).scalar()
            # (a left-over claim: wait for its lease, then a run recovers it)
            if soonest is not None:
                wait = (_utc(soonest) - datetime.now(UTC)).total_seconds()
                if wait > deadline - time.monotonic():
                    raise AssertionError(
                        f"stages of {process} stay claimed {wait:.0f}s more (no run holds "
                        f"them now): {left}; runs: {[(c, round(t, 1)) for c, _, t in results]}")
                time.sleep(max(wait, 0) + 0.5)
        results.append(procs.run(f"{name}-{len(results) + 1}", command, env,
                                 timeout=max(10, deadline - time.monotonic())))
    raise AssertionError(f"work of {process} left after {timeout}s: "
                         f"{runnable_or_running(engine, process)}; runs: "
                         f"{[(c, round(t, 1)) for c, _, t in results]}")


def _utc(value: Any) -> datetime:
    """A timestamp read with plain SQL (text on SQLite) as an aware UTC datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
