"""Standing proof: four processes write one SQLite file at once, and none is refused.

The embedded set-up (README: one SQLite file, ``TRACKING_DATABASE_URL=sqlite:///...``) under
contention: two resume loops (``tracking run`` again and again, against a Prefect server of
the test's own), CLI intake (``tracking intake`` of a new CSV file, in a loop; each file
overlaps the last, so it has duplicates) and the HTTP API (``tracking api``) with one thread
posting transactions (some duplicates of the CSV items) and one reading reports. Nothing may
fail with ``database is locked`` (or anything else), and at the end every item is accounted
for: one transaction per distinct key, in the final state the outcome pattern implies, its
side effects and recorded attempts one to one.

Marked ``slow``.
"""

from __future__ import annotations

import csv
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.pg import free_port
from tests.proof_processes import PLATFORMS, SIDE_EFFECTS_ENV, expected, proof
from tests.proof_support import (
    BIN,
    audit_problems,
    base_env,
    duplicates,
    engine_for,
    events_of_kind,
    prefect_server,
    processes,
    read_side_effects,
    run_until_done,
    stage_rows,
)

FILES = 8
PER_FILE = 150
OVERLAP = 20
API_BASE = 100_000


@pytest.fixture(scope="module")
def prefect_api_url(tmp_path_factory):
    with prefect_server(tmp_path_factory.mktemp("contention-prefect")) as url:
        yield url


def _key(n: int) -> str:
    return f"P{n:07d}"


def _write_csv(path, numbers) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "n"])
        writer.writerows([_key(n), n] for n in numbers)


def _locked_lines(procs) -> dict[str, list[str]]:
    """The lines saying ``database is locked`` in the subprocesses' output, per process."""
    found = {}
    for path in procs.logs.glob("*.log"):
        lines = [line for line in path.read_text(errors="replace").splitlines()
                 if "database is locked" in line.lower()]
        if lines:
            found[path.stem] = lines[:3]
    return found


@pytest.mark.slow
def test_four_processes_share_one_sqlite_file_without_locking_errors(tmp_path, prefect_api_url):
    url = f"sqlite:///{tmp_path / 'contention.db'}"
    side_effects = tmp_path / "side-effects.log"
    env = base_env(
        TRACKING_DATABASE_URL=url,
        TRACKING_PROCESSES="tests.proof_processes:processes",
        PREFECT_API_URL=prefect_api_url,
        **{SIDE_EFFECTS_ENV: str(side_effects)},
    )
    tracking = str(BIN / "tracking")
    files = []
    for i in range(FILES):
        start = i * (PER_FILE - OVERLAP)
        path = tmp_path / f"items-{i}.csv"
        _write_csv(path, range(start, start + PER_FILE))
        files.append(path)
    csv_keys = {_key(n) for i in range(FILES)
                for n in range(i * (PER_FILE - OVERLAP), i * (PER_FILE - OVERLAP) + PER_FILE)}

    t0 = time.monotonic()
    with processes(tmp_path / "logs") as procs:
        port = free_port()
        api = procs.start("api", [tracking, "api", "--port", str(port)], env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert api.poll() is None, procs.tail("api")
            assert time.monotonic() < deadline, f"the API did not start:\n{procs.tail('api')}"
            time.sleep(0.3)

        intake_done = threading.Event()
        stop_load = threading.Event()
        results: dict[str, list] = {"intake": [], "resume": [], "api": [], "posted": []}
        errors: list[BaseException] = []

        def guarded(fn):
            def run():
                try:
                    fn()
                except BaseException as exc:  # surfaced by the main thread
                    errors.append(exc)
                    intake_done.set()
                    stop_load.set()
            return threading.Thread(target=run, daemon=True)

        def intake() -> None:
            try:
                for i, path in enumerate(files):
                    results["intake"].append(procs.run(
                        f"intake-{i}", [tracking, "intake", proof.code, str(path),
                                        "--format", "json"], env, timeout=120))
            finally:
                intake_done.set()

        def resume(which: int) -> None:
            runs = 0
            while not intake_done.is_set() or runs < 2:
                results["resume"].append(procs.run(
                    f"resume-{which}-{runs}", [tracking, "run", proof.code, "--granularity",
                                               "batch", "--batch-size", "50",
                                               "--concurrency", "2", "--format", "json"],
                    env, timeout=150))
                runs += 1

        def post() -> None:
            with httpx.Client(base_url=base, timeout=60) as client:
                i = 0
                while not stop_load.is_set():
                    # Every fifth post is an item of the CSV files (a duplicate, or the
                    # first of its key if the CLI has not taken it in yet).
                    n = (i * 37) % (FILES * (PER_FILE - OVERLAP)) if i % 5 == 4 else API_BASE + i
                    r = client.post("/transactions", json={
                        "process": proof.code, "payload": {"key": _key(n), "n": n},
                        "source": "api"})
                    results["api"].append(("POST /transactions", r.status_code, r.text[:300]))
                    results["posted"].append(_key(n))
                    i += 1

        def read() -> None:
            with httpx.Client(base_url=base, timeout=60) as client:
                while not stop_load.is_set():
                    for path in ("/reports/summary", "/reports/stages", "/reports/errors",
                                 "/transactions"):
                        r = client.get(path, params={"process": proof.code})
                        results["api"].append((f"GET {path}", r.status_code, r.text[:300]))
                    time.sleep(0.05)

        threads = [guarded(intake), guarded(lambda: resume(1)), guarded(lambda: resume(2)),
                   guarded(post), guarded(read)]
        for t in threads:
            t.start()
        intake_done.wait(300)
        time.sleep(2)  # the API keeps writing while the resume loops finish their runs
        stop_load.set()
        for t in threads:
            t.join(300)
        t_load = time.monotonic()
        assert not errors, errors
        assert api.poll() is None, f"the API died:\n{procs.tail('api')}"

        statuses = Counter(status for _, status, _ in results["api"])
        print(f"\nproof contention, load phase ({t_load - t0:.1f}s): {len(results['intake'])} "
              f"intakes (exit codes {Counter(c for c, _, _ in results['intake'])}), "
              f"{len(results['resume'])} resume runs (exit codes "
              f"{Counter(c for c, _, _ in results['resume'])}), API {dict(statuses)} "
              f"({len(results['posted'])} posts)")
        # Nothing was refused while the four wrote at once.
        locked = _locked_lines(procs)
        assert not locked, f"'database is locked' in {locked}"
        bad_intake = [(c, o[-1500:]) for c, o, _ in results["intake"] if c != 0]
        assert not bad_intake, bad_intake
        assert len(results["intake"]) == FILES
        bad_runs = [(c, o[-1500:]) for c, o, _ in results["resume"] if c != 0]
        assert not bad_runs, bad_runs
        assert len(results["resume"]) >= 4
        bad_api = [r for r in results["api"] if r[1] not in (200, 201)]
        assert not bad_api, bad_api[:5]

        engine = engine_for(url)
        resume_cmd = [tracking, "run", proof.code, "--granularity", "batch", "--format", "json"]
        final_runs = run_until_done(procs, resume_cmd, env, engine, proof.code, timeout=150,
                                    name="resume-final")
        t_end = time.monotonic()
        effects = [a for a, _ in read_side_effects(side_effects)]
        attempts = events_of_kind(engine, "ATTEMPT")
        rows = stage_rows(engine)
        problems = audit_problems(engine)
        with engine.connect() as conn:
            keys = dict(conn.exec_driver_sql("SELECT uuid, business_key FROM tx_process").all())
        engine.dispose()
        locked = _locked_lines(procs)

    print(f"proof contention: {len(final_runs)} resume runs after the load; {len(keys)} "
          f"transactions; {len(effects)} side effects, {len(attempts)} ATTEMPT events; "
          f"total {t_end - t0:.1f}s")

    assert not locked, f"'database is locked' in {locked}"
    assert all(c == 0 for c, _, _ in final_runs), [o[-1500:] for c, o, _ in final_runs if c]
    assert statuses[201] >= 50, "the API load was too light to prove anything"

    # Every item is accounted for: one transaction per distinct key, in its final state.
    assert set(keys.values()) == csv_keys | set(results["posted"])
    assert len(keys) == len(set(keys.values()))
    by_tx: dict[str, dict[str, object]] = {}
    for r in rows:
        by_tx.setdefault(r.uuid, {"tx": r.tx_state})[r.platform] = (r.state, r.attempt)
    wrong = [(keys[u], got) for u, got in by_tx.items()
             if (got["tx"], {p: got[p] for p in PLATFORMS})
             != (expected(int(keys[u][1:])).tx_state, expected(int(keys[u][1:])).stages)]
    assert not wrong, f"{len(wrong)} items differ from the pattern, e.g. {wrong[:3]}"
    assert not duplicates(attempts), duplicates(attempts)
    assert not duplicates(effects), duplicates(effects)
    assert set(effects) == set(attempts)
    assert problems == [], problems[:20]
