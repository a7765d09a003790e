"""Standing proof: resume runs killed with ``kill -9`` at random moments, or stopped with
SIGTERM, lose nothing and record nothing twice, on SQLite and PostgreSQL.

Each run is a real ``resume_flow`` in a subprocess of its own against a Prefect server of
our own. Every platform call appends to a side-effect log (what the outside world saw);
the tests compare that log with the audit trail.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from tests.crash_processes import crash
from tests.pg import fresh_database
from tests.proof_processes import SIDE_EFFECTS_ENV, SLEEP_ENV, expected
from tests.proof_support import (
    audit_problems,
    base_env,
    duplicates,
    engine_for,
    events_of_kind,
    prefect_server,
    processes,
    read_side_effects,
    run_until_done,
)
from tracking import Tracker, connect

pytestmark = [pytest.mark.slow]
ITEMS = 600
KILLS = 12
CONCURRENCY = 4
LEASE_SECONDS = 3  # a lost attempt comes back 3 s after the kill


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory) -> str:
    with prefect_server(tmp_path_factory.mktemp("prefect")) as api_url:
        yield api_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request, tmp_path) -> str:
    """A fresh tracking database: a SQLite file, or a database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tracking.db'}"
        return
    server = os.environ.get("TRACKING_TEST_POSTGRES_URL")
    if not server:
        pytest.skip("TRACKING_TEST_POSTGRES_URL is not set")
    with fresh_database(server, "crash_proof") as url:
        yield url


def _run_command(granularity: str) -> list[str]:
    code = (
        "from tracking.flows import resume_flow; "
        f"resume_flow(process='CRASH', granularity={granularity!r}, batch_size=25, "
        f"concurrency={CONCURRENCY}, lease_seconds={LEASE_SECONDS})"
    )
    return [sys.executable, "-c", code]


def _intake(url: str) -> dict[str, int]:
    tracker = Tracker(connect(url, migrate=True), processes=[crash])
    items = [{"key": f"C{n:05d}", "n": n} for n in range(ITEMS)]
    uuids = {r.uuid: n for r, n in zip(tracker.start_many("CRASH", items), range(ITEMS),
                                        strict=True)}
    tracker.engine.dispose()
    return uuids


def _final_picture(engine: sa.Engine) -> dict[str, tuple[str, dict[str, tuple[str, int]]]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT s.uuid, s.platform, s.state, s.attempt, t.state AS tx_state "
            "FROM tx_stage s JOIN tx_process t ON t.uuid = s.uuid")).all()
    picture: dict[str, tuple[str, dict[str, tuple[str, int]]]] = {}
    for r in rows:
        picture.setdefault(r.uuid, (r.tx_state, {}))[1][r.platform] = (r.state, r.attempt)
    return picture


# Stage granularity on SQLite, batch granularity on PostgreSQL (as several workers would).
@pytest.mark.parametrize(
    ("database", "granularity"),
    [("sqlite", "stage"), pytest.param("postgres", "batch", marks=pytest.mark.postgres)],
    indirect=["database"],
)
def test_runs_killed_at_random_moments_lose_nothing_and_record_nothing_twice(
    prefect_api, database, tmp_path, granularity
):
    uuids = _intake(database)
    effects = tmp_path / "side-effects.log"
    env = base_env(
        PREFECT_API_URL=prefect_api, TRACKING_DATABASE_URL=database,
        TRACKING_PROCESSES="tests.crash_processes:processes",
        # 20 ms a call: the work outlasts the kills however fast the store records it.
        **{SIDE_EFFECTS_ENV: str(effects), SLEEP_ENV: "0.02"},
    )
    engine = engine_for(database)
    rng = random.Random(8)
    kills = 0
    t0 = time.monotonic()
    with processes(tmp_path / "logs") as procs:
        while kills < KILLS:
            seen = len(read_side_effects(effects))
            proc = procs.start(f"killed-{kills + 1}", _run_command(granularity), env)
            # Kill it at a random moment once it is calling platforms.
            deadline = time.monotonic() + 60
            while len(read_side_effects(effects)) == seen and proc.poll() is None:
                assert time.monotonic() < deadline, procs.tail(f"killed-{kills + 1}")
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            if proc.poll() is not None:  # it finished everything: nothing left to kill
                break
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            kills += 1
        runs = run_until_done(procs, _run_command(granularity), env, engine, "CRASH",
                              timeout=240)
    elapsed = time.monotonic() - t0
    assert all(code == 0 for code, _, _ in runs), [out[-2000:] for c, out, _ in runs if c]

    side_effects = [a for a, _ in read_side_effects(effects)]
    attempts = events_of_kind(engine, "ATTEMPT")
    lost = events_of_kind(engine, "LEASE_EXPIRED")
    released = events_of_kind(engine, "RELEASED")
    # Nothing recorded twice, the audit trail agrees with the stage rows.
    assert duplicates(attempts + lost) == {}
    assert audit_problems(engine) == []
    # Every recorded attempt was executed exactly once; every side effect is recorded, as an
    # attempt or (killed mid-call) as a lost attempt.
    effect_counts = Counter(side_effects)
    assert duplicates(side_effects) == {}
    assert all(effect_counts[a] == 1 for a in attempts)
    assert set(side_effects) <= set(attempts) | set(lost)
    # Attempts were lost only by stages that were running when a run was killed.
    assert kills >= 10
    assert len(lost) <= kills * CONCURRENCY
    # Nothing lost: every item finished, as an uninterrupted run would have finished it,
    # except where a running attempt was lost.
    picture = _final_picture(engine)
    assert len(picture) == ITEMS
    hit = {a.uuid for a in lost}
    differ = []
    for uuid, n in uuids.items():
        tx_state, stages = picture[uuid]
        assert tx_state in ("COMPLETED", "REJECTED", "EXHAUSTED"), (uuid, tx_state, stages)
        want = expected(n)
        if uuid not in hit and (tx_state, stages) != (want.tx_state, want.stages):
            differ.append((n, tx_state, stages, want))
    assert differ == []
    print(f"\n{granularity} on {engine.dialect.name}: {ITEMS} items, {kills} kills, "
          f"{len(side_effects)} side effects, {len(attempts)} attempts recorded, "
          f"{len(lost)} lost attempts, {len(released)} reservations given back, "
          f"{len(runs)} finishing runs, {elapsed:.0f} s")
    engine.dispose()


def test_a_run_stopped_by_sigterm_gives_back_what_it_did_not_start(
    prefect_api, database, tmp_path
):
    uuids = _intake(database)
    effects = tmp_path / "side-effects.log"
    env = base_env(
        PREFECT_API_URL=prefect_api, TRACKING_DATABASE_URL=database,
        TRACKING_PROCESSES="tests.crash_processes:processes",
        **{SIDE_EFFECTS_ENV: str(effects), SLEEP_ENV: "0.05"},
    )
    # Batches of 50 calls of 50 ms: the run holds 100 stages, 2 of them running.
    command = [sys.executable, "-c",
               "from tracking.flows import resume_flow; resume_flow(process='CRASH', "
               "granularity='batch', batch_size=50, concurrency=2)"]
    engine = engine_for(database)
    with processes(tmp_path / "logs") as procs:
        proc = procs.start("stopped", command, env)
        deadline = time.monotonic() + 60
        while len(read_side_effects(effects)) < 10:
            assert time.monotonic() < deadline and proc.poll() is None, procs.tail("stopped")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(30)
        stopped_in = time.monotonic() - t0
    with engine.connect() as conn:
        held = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE started_at IS NULL) AS reserved, "
            "count(*) FILTER (WHERE started_at IS NOT NULL) AS running "
            "FROM tx_stage WHERE state = 'IN_PROGRESS'")).one()
    released = events_of_kind(engine, "RELEASED")
    # Nothing stays blocked for the lease (1800 s by default): what had not started is
    # runnable again at once, attempts intact; the running calls finished and were recorded.
    assert (held.reserved, held.running) == (0, 0)
    assert len(released) > 0 and all(a.attempt == 0 for a in released)
    assert Counter(a for a, _ in read_side_effects(effects)) == Counter(
        events_of_kind(engine, "ATTEMPT"))
    assert audit_problems(engine) == []
    assert stopped_in < 20
    print(f"\nSIGTERM on {engine.dialect.name}: stopped in {stopped_in:.1f} s, "
          f"{len(released)} reservations given back, {len(uuids)} items")
    engine.dispose()
