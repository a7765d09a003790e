"""Standing proof: the tracking database goes down in the middle of a resume run.

A throwaway PostgreSQL cluster (``tests/pg.py``: started by the test, never the machine's
server) holds the items of the OUTAGE process (``tests/proof_processes.py``: two platforms
that sleep a little per call and log a side effect). A resume run (``tracking run`` in a
subprocess, ``TRACKING_DATABASE_URL`` pointing at the cluster) is going when the cluster is
stopped with ``pg_ctl stop -m immediate`` (every connection drops, as in a crash):

* the run fails clearly and fast: non-zero exit within seconds, an error naming the database;
* nothing is half-written: the audit trail agrees with the stage rows;
* after a restart, further runs finish the work: every item completed, and the side effects
  match the recorded attempts one to one, except the attempts that were in flight when the
  database went away (their call happened, their result could not be written). Those are
  few (at most the run's concurrency), and each is in the audit trail as a lost attempt
  (LEASE_EXPIRED); a stage that was only reserved, not started, loses no attempt.

Marked ``slow``.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.pg import postgres_bin, throwaway_cluster
from tests.proof_processes import SIDE_EFFECTS_ENV, SLEEP_ENV, outage
from tests.proof_support import (
    BIN,
    audit_problems,
    base_env,
    duplicates,
    engine_for,
    events_of_kind,
    flow_runs,
    prefect_server,
    processes,
    read_side_effects,
    run_until_done,
    stage_rows,
)
from tracking import Tracker, connect

CONCURRENCY = 4
LEASE_SECONDS = 8  # an attempt's lease: far above a call (30 ms), short for the test
FAIL_WITHIN_SECONDS = 20
DATABASE = "proof_outage"


@pytest.fixture(scope="module")
def prefect_api_url(tmp_path_factory):
    try:
        postgres_bin("initdb")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with prefect_server(tmp_path_factory.mktemp("outage-prefect")) as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize(("granularity", "items"), [("batch", 500), ("stage", 160)])
def test_database_outage_mid_run_fails_fast_and_loses_nothing(
    tmp_path, prefect_api_url, granularity, items
):
    side_effects = tmp_path / "side-effects.log"
    with throwaway_cluster() as cluster, processes(tmp_path / "logs") as procs:
        url = cluster.create_database(DATABASE)
        tracker = Tracker(connect(url, migrate=True), processes=[outage])
        payloads = [{"key": f"O{i:05d}"} for i in range(items)]
        assert all(r.is_new for r in tracker.start_many(outage.code, payloads))
        tracker.engine.dispose()
        env = base_env(
            TRACKING_DATABASE_URL=url,
            TRACKING_PROCESSES="tests.proof_processes:processes",
            TRACKING_LEASE_SECONDS=str(LEASE_SECONDS),
            PREFECT_API_URL=prefect_api_url,
            **{SIDE_EFFECTS_ENV: str(side_effects), SLEEP_ENV: "0.03"},
        )
        command = [str(BIN / "tracking"), "run", outage.code, "--granularity", granularity,
                   "--batch-size", "10", "--concurrency", str(CONCURRENCY), "--format", "json"]

        # The run is going (some items past X, some in Y) when the database goes away.
        run = procs.start("resume-outage", command, env)
        deadline = time.monotonic() + 120
        while len(read_side_effects(side_effects)) < items * 1.3:
            assert run.poll() is None, f"the run ended before the outage:\n" \
                                       f"{procs.tail('resume-outage')}"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.05)
        cluster.stop("immediate")
        stopped_at = time.monotonic()
        try:
            code = run.wait(timeout=120)
        except Exception:
            pytest.fail(f"the run hung after the outage:\n{procs.tail('resume-outage')}")
        failed_after = time.monotonic() - stopped_at
        output = procs.log_path("resume-outage").read_text(errors="replace")
        outage_run = flow_runs(prefect_api_url)[-1]  # the newest: the one that failed
        time.sleep(0.5)
        effects_at_outage = len(read_side_effects(side_effects))

        cluster.start()
        engine = engine_for(url)
        half_written = audit_problems(engine)
        in_progress = sum(1 for s in stage_rows(engine) if s.state == "IN_PROGRESS")

        later = run_until_done(procs, command, env, engine, outage.code, timeout=150)

        effects = [a for a, _ in read_side_effects(side_effects)]
        attempts = events_of_kind(engine, "ATTEMPT")
        lost = events_of_kind(engine, "LEASE_EXPIRED")
        released = events_of_kind(engine, "RELEASED")
        rows = stage_rows(engine)
        problems = audit_problems(engine)
        engine.dispose()

    unrecorded = Counter(effects) - Counter(attempts)
    executed = Counter((a.uuid, a.platform, a.stage) for a in effects)
    again = sum(n - 1 for n in executed.values())
    failure_line = next((line for line in output.splitlines() if "tracking: failed" in line),
                        output.strip().splitlines()[-1] if output.strip() else "")
    print(f"\nproof outage ({granularity}): {items} items x 2 platforms; outage after "
          f"{effects_at_outage} side effects; run exited {code} {failed_after:.1f}s after "
          f"the stop; {in_progress} stages left IN_PROGRESS; {len(later)} later runs "
          f"({[round(t, 1) for _, _, t in later]}s); {len(effects)} side effects, "
          f"{len(attempts)} ATTEMPT, {len(lost)} LEASE_EXPIRED, {len(released)} RELEASED "
          f"events; {sum(unrecorded.values())} side effects unrecorded, {again} stages "
          f"executed more than once\n  failure: {failure_line[:300]}\n  flow run "
          f"{outage_run.state.name}: {(outage_run.state.message or '')[:300]}")

    # The run failed clearly and fast.
    assert code != 0, f"the run exited 0 although its database went away:\n{output[-3000:]}"
    assert failed_after < FAIL_WITHIN_SECONDS, f"the run took {failed_after:.1f}s to fail"
    assert str(cluster.port) in failure_line or DATABASE in failure_line, \
        f"the error does not name the database (127.0.0.1:{cluster.port}/{DATABASE}): " \
        f"{failure_line!r}"
    # So does its flow run, in the Prefect UI.
    assert outage_run.state.type.value == "FAILED", outage_run.state
    message = outage_run.state.message or ""
    assert str(cluster.port) in message or DATABASE in message, message
    # Nothing half-written.
    assert half_written == [], half_written[:20]
    # The later runs finished the work.
    assert all(c == 0 for c, _, _ in later), [o[-2000:] for c, o, _ in later if c]
    assert {r.tx_state for r in rows} == {"COMPLETED"}
    assert {(r.state, r.platform) for r in rows} == {("COMPLETED", "X"), ("COMPLETED", "Y")}
    assert len(rows) == 2 * items
    assert problems == [], problems[:20]
    # Nothing doubled: no attempt recorded twice, none recorded without its side effect...
    assert not duplicates(attempts), duplicates(attempts)
    assert not duplicates(effects), f"an attempt number was executed twice: " \
                                    f"{duplicates(effects)}"
    assert not set(attempts) - set(effects), "ATTEMPT events without a side effect"
    # ...except the attempts in flight at the outage: a side effect, no result. Each of them
    # is a lost attempt in the audit trail, and there are at most as many as calls at once.
    assert set(unrecorded) <= set(lost), \
        f"side effects neither recorded nor counted as lost: {set(unrecorded) - set(lost)}"
    assert len(lost) <= CONCURRENCY, (
        f"{len(lost)} attempts counted as lost, but at most {CONCURRENCY} calls were in "
        f"flight: reserved stages that never started lost an attempt")
    assert again <= CONCURRENCY
