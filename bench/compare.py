"""This project against the seed library rpa-tracker 0.0.18, on the same workload in one run.

The workload (``bench/compare_workload.py``, shared by both sides): a process with platforms A
(at most 1 attempt), B (at most 2) and C (unlimited); item ``i`` gets a business error, a
system error or a success on each platform from a fixed pattern; two hourly runs each process
every runnable stage once, platform by platform (A, B, C). For each size N, on a fresh SQLite
file per measurement:

* rpa-tracker, in a venv of its own (``build/bench-venv-rpa-tracker``: ``pip install
  rpa-tracker==0.0.18``, created once and reused), driven by
  ``bench/compare_rpa_tracker_driver.py`` as a subprocess: ``start_or_resume`` +
  ``start_stage`` per platform for each item, then per run and platform
  ``get_pending_stages`` and ``complete_stage`` per stage; twice: with this project's SQLite
  settings (WAL, synchronous=NORMAL: the libraries compared, not fsync per commit) and as
  shipped (SQLite's defaults, as the issue measured it);
* this project, one by one: ``Tracker.start_or_resume`` per item, then per run and platform
  ``claim`` 500 at a time, ``start_attempt`` + ``complete_stage`` per stage;
* this project, in batches: ``start_many`` in chunks of 1,000, then per run and platform
  ``reserve(start=True)`` 500 at a time (a resume run's claim, which starts the attempts of
  a batch of an ``idempotent`` platform with it), then one ``complete_batch`` per batch
  (``complete_many`` answered in brief, as a resume run records a batch).

Every measurement ends with a check: the final state of each transaction and the state and
attempt count of each of its stages must be what the outcome pattern implies under that
library's rules (rpa-tracker has no EXHAUSTED state: a stage out of attempts stays
TERMINATED); the script fails loudly otherwise. Results go to ``bench/RESULTS.md`` (ratios
first) and ``bench/results/compare.json``; the summary is printed.

Usage:
    .venv/bin/python bench/compare.py             # N = 1k, 10k (both), 100k, 333k (this one)
    make bench-compare                            # the same
    .venv/bin/python bench/compare.py --quick     # smoke run, N = 200
    .venv/bin/python bench/compare.py --sizes 1000,10000 --rpa-max-n 10000
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(ROOT), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import compare_workload as w  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from bench_store import Timed, database_size, fresh_database, metadata, payload  # noqa: E402

from tracking import (  # noqa: E402
    Completion,
    ExecutionResult,
    KeyFields,
    LeaseLost,
    Platform,
    Process,
    RetryPolicy,
    Tracker,
    connect,
)
from tracking.memory import rarer_young_collections  # noqa: E402
from tracking.sqlite import SQLITE_CACHE_KIB, SQLITE_WAL_CHECKPOINT_PAGES  # noqa: E402

RPA_REQUIREMENT = "rpa-tracker==0.0.18"
RPA_VENV = ROOT / "build" / "bench-venv-rpa-tracker"
DRIVER = BENCH / "compare_rpa_tracker_driver.py"
RESULTS_DIR = BENCH / "results"
CLAIM_LIMIT = 500
#: The N of the issue's targets for this comparison.
TARGET_N = 10_000
CHUNK = 1000
# The code the speed issue was filed against (2026-11-23): "now" in "3x faster than now".
ISSUE_BASELINE = "4dbeea5"
#: The SQLite settings of ``tracking.sqlite`` that matter to a single writer, given to rpa-tracker
#: too, so that the comparison is of the libraries, not of fsync per commit. rpa-tracker is
#: also measured as shipped (SQLite's defaults), as the issue measured it.
PROJECT_PRAGMAS = ["journal_mode=WAL", "synchronous=NORMAL", f"cache_size=-{SQLITE_CACHE_KIB}",
                   f"wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}"]

SIDES = {
    "rpa_shipped": "rpa-tracker 0.0.18 as shipped",
    "rpa": "rpa-tracker 0.0.18, this project's SQLite settings",
    "stage": "this project, one by one",
    "batch": "this project, batches",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the rpa-tracker venv ----------------------------------------------------------------------


def rpa_python(venv: Path) -> Path:
    """The python of the rpa-tracker venv, created (or completed) when needed.

    SQLAlchemy is pinned to this venv's version, so both sides run the same ORM/Core.
    """
    python = venv / "bin" / "python"
    want = f"0.0.18 {sa.__version__}"
    probe = (
        "from importlib.metadata import version as v; "
        "print(v('rpa-tracker'), v('sqlalchemy'))"
    )
    if python.exists():
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout
        if found.strip() == want:
            return python
    else:
        log(f"creating {venv.relative_to(ROOT) if venv.is_relative_to(ROOT) else venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    log(f"pip install {RPA_REQUIREMENT} sqlalchemy=={sa.__version__}")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         RPA_REQUIREMENT, f"sqlalchemy=={sa.__version__}"],
        check=True,
    )
    found = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    if found.stdout.strip() != want:
        raise SystemExit(f"{venv}: expected rpa-tracker/sqlalchemy {want}, got {found.stdout}")
    return python


# -- what the workload must end in -------------------------------------------------------------


def expected_final(n: int, rules: str) -> tuple[list[str], list[list[tuple[str, int]]]]:
    """The final transaction state and (state, attempts) per platform stage of items 0..n-1.

    ``rules`` is ``"tracking"`` (this project: ``tracking.states.decide``) or ``"rpa"``
    (rpa-tracker 0.0.18's ``get_pending_stages`` / ``finish_stage``).
    """
    last = len(w.PLATFORMS) - 1
    txs, all_stages = [], []
    for i in range(n):
        states, attempts, tx = ["PENDING"] * (last + 1), [0] * (last + 1), "PENDING"
        for _ in range(w.RUNS):
            for k, (code, _, max_attempts, _) in enumerate(w.PLATFORMS):
                earlier_done = all(s == "COMPLETED" for s in states[:k])
                has_attempts = max_attempts is None or attempts[k] < max_attempts
                if rules == "tracking":
                    tx_open = tx not in ("COMPLETED", "REJECTED", "EXHAUSTED", "CANCELLED")
                else:
                    tx_open = tx in ("PENDING", "IN_PROGRESS", "TERMINATED")
                if not (tx_open and states[k] in ("PENDING", "TERMINATED") and earlier_done
                        and has_attempts):
                    continue
                attempts[k] += 1
                code_ = w.outcome(i, code, attempts[k])
                if code_ == 0:
                    states[k] = "COMPLETED"
                    if rules == "tracking":
                        tx = "COMPLETED" if k == last else "IN_PROGRESS"
                    elif not any(s in ("PENDING", "IN_PROGRESS") for s in states):
                        tx = "COMPLETED"
                    elif tx == "PENDING":
                        tx = "IN_PROGRESS"
                elif code_ > 0:
                    states[k], tx = "REJECTED", "REJECTED"
                    cancel = ("PENDING", "TERMINATED") if rules == "tracking" else ("PENDING",)
                    states = ["CANCELLED" if s in cancel else s for s in states]
                elif rules == "tracking" and max_attempts is not None and (
                    attempts[k] >= max_attempts
                ):
                    states[k], tx = "EXHAUSTED", "EXHAUSTED"
                else:
                    states[k] = "TERMINATED"
                    if rules == "tracking" or tx != "REJECTED":
                        tx = "TERMINATED"
        txs.append(tx)
        all_stages.append(list(zip(states, attempts, strict=True)))
    return txs, all_stages


def check_final(label: str, n: int, rules: str, tx: list[str], stages: list[list[Any]]) -> int:
    """Raise (loudly) unless every item ended as ``rules`` imply; returns the items checked."""
    want_tx, want_stages = expected_final(n, rules)
    got_stages = [[tuple(s) if s is not None else None for s in row] for row in stages]
    bad = [
        f"  item {i}: transaction {tx[i]!r}, stages {got_stages[i]} "
        f"(expected {want_tx[i]!r}, {want_stages[i]})"
        for i in range(n)
        if tx[i] != want_tx[i] or got_stages[i] != want_stages[i]
    ]
    if len(tx) != n or bad:
        raise SystemExit(
            f"CHECK FAILED: {label} at N={n:,}: {len(bad):,} items not in the expected state"
            + (f" ({len(tx):,} transactions found)" if len(tx) != n else "")
            + ":\n" + "\n".join(bad[:10])
        )
    return n


def same_work(n: int) -> None:
    """Both rule sets make the same attempts on the same stages (a fair comparison)."""
    a = [[k for _, k in row] for row in expected_final(n, "tracking")[1]]
    b = [[k for _, k in row] for row in expected_final(n, "rpa")[1]]
    if a != b:
        raise SystemExit("the two sides would not make the same attempts: workload bug")


# -- rpa-tracker side ---------------------------------------------------------------------------


def run_rpa(python: Path, n: int, workdir: Path, payload_file: Path,
            pragmas: list[str]) -> dict[str, Any]:
    db = workdir / f"rpa-{n}.db"
    cmd = [str(python), str(DRIVER), "--database", str(db), "--payloads", str(payload_file)]
    for pragma in pragmas:
        cmd += ["--pragma", pragma]
    wall = time.perf_counter()
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(done.stdout)
        result["database_bytes"] = sum(
            os.path.getsize(f"{db}{s}") for s in ("", "-wal") if os.path.exists(f"{db}{s}")
        )
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    result["process_seconds"] = time.perf_counter() - wall
    final = result.pop("final")
    result["checked"] = check_final("rpa-tracker", n, "rpa", final["tx"], final["stages"])
    return result


# -- this project -------------------------------------------------------------------------------


def tracking_process() -> Process:
    return Process(
        w.PROCESS,
        platforms=[
            Platform(code, order=order, retry=RetryPolicy(max_attempts=max_attempts))
            for code, order, max_attempts, _ in w.PLATFORMS
        ],
        dedup=KeyFields("id"),
        description="bench/compare.py workload",
    )


def hourly_run(tracker: Tracker, owner: str, batched: bool,
               index_of: dict[str, int]) -> dict[str, Any]:
    """Every runnable stage once, platform by platform, as ``owner`` (one run)."""
    claim, start, record = Timed(), Timed(), Timed()
    attempts: dict[str, int] = {}
    began = time.perf_counter()
    # As the resume flow runs its batches: young objects collected less often, so that the
    # run's short-lived objects do not bring on full collections (tracking.memory).
    with rarer_young_collections():
        for code, *_ in w.PLATFORMS:
            count = 0
            # A resume run reserves (``Tracker.reserve``: what a platform call needs) and, for a
            # batch of an idempotent platform, starts its attempts with the claim; one by one
            # claims whole stages, as a worker of the per-stage API would.
            find = functools.partial(tracker.reserve, start=True) if batched else tracker.claim
            while batch := claim.call(find, w.PROCESS, code, owner=owner, limit=CLAIM_LIMIT):
                completions = []
                for s in batch:
                    attempt = s.attempt if batched else start.call(
                        tracker.start_attempt, s.uuid, code, s.stage, owner=owner)
                    error_code = w.outcome(index_of[s.uuid], code, attempt)
                    result = ExecutionResult(error_code, w.description(error_code))
                    if batched:
                        completions.append(Completion(s.uuid, code, s.stage, result))
                    else:
                        record.call(tracker.complete_stage, s.uuid, code, result, stage=s.stage,
                                    owner=owner)
                if completions:
                    done = record.call(tracker.complete_batch, completions, owner=owner)
                    lost = [d for d in done if isinstance(d, LeaseLost)]
                    if lost:
                        raise SystemExit(f"complete_batch lost {len(lost)} leases: {lost[0]}")
                count += len(batch)
            attempts[code] = count
    return {
        "seconds": time.perf_counter() - began,
        "find_seconds": sum(claim.latencies),
        "start_seconds": sum(start.latencies),
        "record_seconds": sum(record.latencies),
        "claims": len(claim.latencies),
        "attempts": sum(attempts.values()),
        "attempts_by_platform": attempts,
    }


def run_tracking(n: int, batched: bool, workdir: Path,
                 payloads: list[dict[str, Any]]) -> dict[str, Any]:
    label = SIDES["batch" if batched else "stage"]
    result: dict[str, Any] = {"n": n}
    with fresh_database(None, workdir, n) as url:
        t0 = time.perf_counter()
        engine = connect(url, migrate=True)
        tracker = Tracker(engine, processes=[tracking_process()])
        result["setup_seconds"] = time.perf_counter() - t0

        index_of: dict[str, int] = {}
        intake = Timed()
        with intake.running():
            if batched:
                for lo in range(0, n, CHUNK):
                    for k, done in enumerate(
                        intake.call(tracker.start_many, w.PROCESS, payloads[lo : lo + CHUNK],
                                    source="bench")
                    ):
                        assert done.is_new
                        index_of[done.uuid] = lo + k
            else:
                for i, p in enumerate(payloads):
                    uuid, is_new = intake.call(tracker.start_or_resume, w.PROCESS, p,
                                               source="bench")
                    assert is_new
                    index_of[uuid] = i
        result["intake"] = {"seconds": intake.wall, "items": n, "calls": len(intake.latencies)}
        log(f"    {label} intake: {n:,} in {intake.wall:.1f}s")

        for run in range(1, w.RUNS + 1):
            r = hourly_run(tracker, f"hourly-run-{run}", batched, index_of)
            result[f"run{run}"] = r
            log(f"    {label} run {run}: {r['attempts']:,} attempts in {r['seconds']:.1f}s")
        result["total_seconds"] = result["intake"]["seconds"] + sum(
            result[f"run{r}"]["seconds"] for r in range(1, w.RUNS + 1)
        )

        column = {code: k for k, (code, *_) in enumerate(w.PLATFORMS)}
        tx = [""] * n
        stages: list[list[Any]] = [[None] * len(w.PLATFORMS) for _ in range(n)]
        with engine.connect() as conn:
            for uuid, state in conn.execute(
                sa.text("SELECT uuid, state FROM tx_process WHERE process_code = :p"),
                {"p": w.PROCESS},
            ):
                tx[index_of[uuid]] = str(state)
            for uuid, platform, state, attempt in conn.execute(
                sa.text("SELECT uuid, platform, state, attempt FROM tx_stage "
                        "WHERE process_code = :p"),
                {"p": w.PROCESS},
            ):
                stages[index_of[uuid]][column[platform]] = [str(state), attempt]
            result["events"] = conn.execute(sa.text("SELECT count(*) FROM tx_event")).scalar()
        result["database_bytes"] = database_size(engine, url)
        engine.dispose()
    result["checked"] = check_final(label, n, "tracking", tx, stages)
    return result


# -- output -------------------------------------------------------------------------------------


def _rel(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _s(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:,.2f} s" if x < 10 else f"{x:,.1f} s"


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}/s"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "–"
    return f"**{a / b:,.1f}×**" if a / b >= 10 else f"**{a / b:,.2f}×**"


#: The rows of the comparison: label, rpa-tracker key, this project's variant and key. A key
#: names a phase (``intake``, ``run1``, ``run2``) or ``total``.
ROWS: list[tuple[str, str, str, str]] = [
    ("intake one by one (rpa: `start_or_resume` + 3 `start_stage`; here: `start_or_resume`)",
     "intake", "stage", "intake"),
    ("intake, rpa one by one vs here `start_many` (chunks of 1,000; rpa-tracker has no bulk "
     "intake)", "intake", "batch", "intake"),
    ("hourly run 1, per stage (here: `claim` 500 + `start_attempt` + `complete_stage`)",
     "run1", "stage", "run1"),
    ("hourly run 1, here `reserve(start=True)` 500 + `complete_batch` per batch",
     "run1", "batch", "run1"),
    ("hourly run 2, per stage", "run2", "stage", "run2"),
    ("hourly run 2, here `reserve(start=True)` 500 + `complete_batch` per batch",
     "run2", "batch", "run2"),
    ("whole workload, one by one + per stage", "total", "stage", "total"),
    ("whole workload, `start_many` + `reserve(start=True)` + `complete_batch`",
     "total", "batch", "total"),
]


#: The ratio tables: against which rpa-tracker measurement, its name and what it means.
RATIO_TABLES = [
    ("rpa", "rpa-tracker with this project's SQLite settings",
     "WAL, synchronous=NORMAL: the libraries compared, not fsync per commit"),
    ("rpa_shipped", "rpa-tracker as shipped",
     "SQLite's defaults: rollback journal, synchronous=FULL, as the issue measured it"),
]


def seconds_of(r: dict[str, Any] | None, key: str) -> float | None:
    if r is None:
        return None
    return r["total_seconds"] if key == "total" else r[key]["seconds"]


def stages_of(r: dict[str, Any], key: str) -> int:
    """Stages handled by a phase: created (intake, whole workload) or attempts recorded."""
    if key in ("intake", "total"):
        return r["n"] * len(w.PLATFORMS)
    return r[key]["attempts"]


def stages_per_s(r: dict[str, Any] | None, key: str) -> float | None:
    s = seconds_of(r, key)
    return None if r is None or not s else stages_of(r, key) / s


def comparison_targets(results: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """The issue's targets for this comparison (at N = 10,000, or the largest N measured):
    (target, figure, met)."""
    r = next((r for r in results if r["n"] == TARGET_N), max(results, key=lambda r: r["n"]))
    n, out = r["n"], []
    for ref, name, _ in RATIO_TABLES:
        mine, theirs = seconds_of(r.get("batch"), "total"), seconds_of(r.get(ref), "total")
        if mine and theirs:
            out.append((f"whole workload at N = {n:,} >= 30x {name}",
                        f"{theirs:,.1f} / {mine:,.2f} s = {theirs / mine:,.1f}x",
                        theirs / mine >= 30))
    stage = r.get("stage")
    if stage:
        intake = n / stage["intake"]["seconds"]
        out.append(("one-by-one intake (`start_or_resume`) >= 2,000 items/s",
                    f"{intake:,.0f}/s", intake >= 2000))
        recorded = stage["run1"]["attempts"] + stage["run2"]["attempts"]
        seconds = stage["run1"]["record_seconds"] + stage["run2"]["record_seconds"]
        out.append(("`complete_stage` >= 2,000/s", f"{recorded / seconds:,.0f}/s",
                    recorded / seconds >= 2000))
    return out


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    both = [r for r in results if r.get("rpa")]
    lines = [
        "# rpa-tracker 0.0.18 vs this project: the same workload, the same run",
        "",
        f"Measured {meta['date_utc']} by `{meta['command']}` "
        f"(commit {meta['git_commit'] or '?'}).",
        "",
        "## Targets",
        "",
        "| target | figure | |",
        "|---|---|---|",
        *(f"| {name} | {figure} | {'met' if met else '**missed**'} |"
          for name, figure, met in comparison_targets(results)),
        "",
    ]
    if both:
        head = "| | " + " | ".join(f"N = {r['n']:,}" for r in both) + " |"
        for ref, name, meaning in RATIO_TABLES:
            measured = [r for r in both if r.get(ref)]
            if not measured:
                continue
            lines += [f"## Ratios: {name} ({meaning})", "",
                      "rpa-tracker time / this project's time (higher: this project is "
                      "faster).", "", head,
                      "|---" * (len(both) + 1) + "|"]
            for label, rkey, side, key in ROWS:
                cells = [_ratio(seconds_of(r.get(ref), rkey), seconds_of(r.get(side), key))
                         for r in both]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += [
            "## Stages per second (rpa-tracker with this project's SQLite settings / this "
            "project)",
            "",
            "Intake and whole workload: stages created (3 per transaction) per second of the "
            "phase; hourly runs: stage attempts recorded per second.",
            "",
            head,
            "|---" * (len(both) + 1) + "|",
        ]
        for label, rkey, side, key in ROWS:
            cells = [
                f"{_rate(stages_per_s(r['rpa'], rkey))} / {_rate(stages_per_s(r.get(side), key))}"
                for r in both
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    else:
        lines.append("(rpa-tracker was not measured in this run)")

    lines += [
        "",
        "## Figures",
        "",
        "Wall-clock seconds of each phase; in brackets the stage attempts recorded by a run. "
        "Find: rpa-tracker `get_pending_stages`, this project `claim` (one by one) or "
        "`reserve(start=True)` (batches: the attempts start with the claim); record: "
        "`complete_stage` / `complete_batch` (this project's `start_attempt` time is in the "
        "run, listed apart in the JSON).",
        "",
        "| N | tracker | intake | run 1 | run 1 find / record | run 2 | whole workload | "
        "stages/s (whole) | events | DB size | check |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        for side, label in SIDES.items():
            x = r.get(side)
            if x is None:
                continue
            lines.append(
                f"| {r['n']:,} | {label} | {_s(x['intake']['seconds'])} | "
                f"{_s(x['run1']['seconds'])} ({x['run1']['attempts']:,}) | "
                f"{_s(x['run1']['find_seconds'])} / {_s(x['run1']['record_seconds'])} | "
                f"{_s(x['run2']['seconds'])} ({x['run2']['attempts']:,}) | "
                f"{_s(x['total_seconds'])} | {_rate(stages_per_s(x, 'total'))} | "
                f"{x['events']:,} | {x['database_bytes'] / 1e6:,.1f} MB | "
                f"{x['checked']:,} items OK |"
            )
    lines += ["", *meta.get("notes", []), "", "## Machine", ""]
    load = meta["load_average_at_start"], meta.get("load_average_at_end")
    lines += [
        f"* {meta['cpus']} CPUs, {meta['machine']}",
        f"* Python {meta['python']}, SQLite {meta['sqlite']}, SQLAlchemy {meta['sqlalchemy']} "
        f"(both venvs), rpa-tracker {meta.get('rpa_tracker', '–')}",
        "* rpa-tracker's SQLite connections: `PRAGMA " + "`, `PRAGMA ".join(meta["rpa_pragmas"])
        + "` (as this project's engine); *as shipped*: SQLite's defaults (rollback journal, "
        "synchronous=FULL)",
        "* load average at start / end: "
        + " / ".join("n/a" if not x else " ".join(f"{v:.2f}" for v in x) for x in load)
        + " (a shared machine: other work makes the figures noisier)",
        f"* date (UTC): {meta['date_utc']}; whole benchmark {meta['elapsed_seconds']:,.0f} s",
    ]
    return "\n".join(lines) + "\n"


# -- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,333334",
                        help="comma-separated N (default 1000,10000,100000,333334: the last "
                        "makes 1,000,000 stages)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 200 only")
    parser.add_argument("--rpa-max-n", type=int, default=10_000,
                        help="rpa-tracker runs only for N up to this (default 10000)")
    parser.add_argument("--stage-max-n", type=int, default=10_000,
                        help="this project's one-by-one variant only for N up to this "
                        "(default 10000: beyond, only the batch variant, made for volume)")
    parser.add_argument("--rpa-shipped-max-n", type=int, default=10_000,
                        help="rpa-tracker as shipped (SQLite's defaults: rollback journal, "
                        "synchronous=FULL) runs too, for N up to this (default 10000; 0: not "
                        "at all); otherwise it runs with this project's WAL / "
                        "synchronous=NORMAL / cache size / checkpoint interval only")
    parser.add_argument("--rpa-venv", type=Path, default=RPA_VENV,
                        help=f"venv for rpa-tracker (default {RPA_VENV.relative_to(ROOT)})")
    parser.add_argument("--output", type=Path, default=None,
                        help="markdown file (default bench/RESULTS.md; with --quick "
                        "bench/results/compare-quick.md)")
    parser.add_argument("--no-companions", action="store_true",
                        help="skip the benchmarks that run after the comparison (bench_prefect.py, "
                        "bench_store.py, bench_one_by_one.py, bench_api.py)")
    parser.add_argument("--postgres-url",
                        default=os.environ.get("TRACKING_TEST_POSTGRES_URL",
                                               "postgresql://postgres@127.0.0.1:5432/test"),
                        help="PostgreSQL server for batch granularity on PostgreSQL "
                        "(a database of its own is created and dropped; '' to skip)")
    args = parser.parse_args(argv)
    sizes = [200] if args.quick else [
        int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()
    ]
    if not sizes or min(sizes) < 1:
        parser.error("sizes must be positive")
    output = args.output or (
        RESULTS_DIR / "compare-quick.md" if args.quick else BENCH / "RESULTS.md"
    )

    began = time.perf_counter()
    python = rpa_python(args.rpa_venv) if min(sizes) <= args.rpa_max_n else None
    workdir = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    meta: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    try:
        with fresh_database(None, workdir, 0) as url:
            meta = metadata(url)
        for n in sizes:
            log(f"N = {n:,} ({n * len(w.PLATFORMS):,} stages)")
            same_work(n)
            payloads = [payload(i) for i in range(n)]
            r: dict[str, Any] = {"n": n}
            if python is not None and n <= args.rpa_max_n:
                payload_file = workdir / f"payloads-{n}.json"
                payload_file.write_text(json.dumps(payloads))
                r["rpa"] = run_rpa(python, n, workdir, payload_file, PROJECT_PRAGMAS)
                if n <= args.rpa_shipped_max_n:
                    r["rpa_shipped"] = run_rpa(python, n, workdir, payload_file, [])
                meta["rpa_tracker"] = r["rpa"]["versions"]["rpa-tracker"]
                payload_file.unlink()
            if args.stage_max_n is None or n <= args.stage_max_n:
                r["stage"] = run_tracking(n, False, workdir, payloads)
            r["batch"] = run_tracking(n, True, workdir, payloads)
            results.append(r)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    companions = [] if args.no_companions else run_companions(args)

    meta.update(
        sqlite=meta["database_version"].removeprefix("SQLite "),
        rpa_pragmas=PROJECT_PRAGMAS,
        date_utc=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=" ".join(["bench/compare.py", *(argv if argv is not None else sys.argv[1:])]),
        load_average_at_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        elapsed_seconds=time.perf_counter() - began,
        notes=notes(results, args),
    )
    text = render(results, meta) + render_companions(companions)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_out = RESULTS_DIR / ("compare-quick.json" if args.quick else "compare.json")
    json_out.write_text(json.dumps({"meta": meta, "results": results,
                                    "companions": companions}, indent=2, default=str))
    print(text)
    print(f"Markdown: {_rel(output)}\nJSON: {_rel(json_out)}")
    return 0


# -- the Prefect layer and the HTTP API, measured in the same run ---------------------------


def companion_commands(args: argparse.Namespace) -> list[tuple[str, list[str], Path]]:
    """(title, command, JSON it writes) of each companion benchmark, run one after another."""
    quick = ["--quick"] if args.quick else []
    out = [
        ("Prefect layer, SQLite: stage granularity vs bare Prefect tasks (a `prefect server "
         "start` server), batch granularity",
         ["bench/bench_prefect.py", "--no-profile", *quick,
          "--output", str(_rel(RESULTS_DIR / "compare-prefect-sqlite.json"))],
         RESULTS_DIR / "compare-prefect-sqlite.json"),
    ]
    if args.postgres_url:
        out.append((
            "Prefect layer, PostgreSQL: batch granularity",
            ["bench/bench_prefect.py", "--no-profile", "--batch-only", *quick,
             "--database-url", args.postgres_url,
             "--output", str(_rel(RESULTS_DIR / "compare-prefect-postgresql.json"))],
            RESULTS_DIR / "compare-prefect-postgresql.json"))
    out.append((
        "Store, SQLite: claim latency at N = 10,000 and 100,000 (flat in N), one-by-one rates "
        "on a table of N",
        ["bench/bench_store.py", *quick,
         "--output", str(_rel(RESULTS_DIR / "compare-store-sqlite.json"))],
        RESULTS_DIR / "compare-store-sqlite.json"))
    out.append((
        f"One by one, SQLite: this tree against the code of the issue's time ({ISSUE_BASELINE}) "
        "and against the bare driver's floor, alternated",
        ["bench/bench_one_by_one.py", "--against", ISSUE_BASELINE, *quick,
         "--output", str(_rel(RESULTS_DIR / "compare-one-by-one.json"))],
        RESULTS_DIR / "compare-one-by-one.json"))
    out.append((
        "HTTP API, SQLite: `POST /transactions` and `GET /reports/summary` at 100k rows",
        ["bench/bench_api.py", *quick,
         "--output", str(_rel(RESULTS_DIR / "compare-api-sqlite.json"))],
        RESULTS_DIR / "compare-api-sqlite.json"))
    return out


def run_companions(args: argparse.Namespace) -> list[dict[str, Any]]:
    done = []
    for title, command, json_file in companion_commands(args):
        log(f"{title}: {' '.join(command)}")
        json_file.unlink(missing_ok=True)  # an earlier run's figures are never reported
        began = time.perf_counter()
        proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True,
                              text=True)
        entry: dict[str, Any] = {"title": title, "command": " ".join(command),
                                 "seconds": time.perf_counter() - began,
                                 "exit_code": proc.returncode}
        if proc.returncode == 0 and json_file.exists():
            entry["result"] = json.loads(json_file.read_text())
        else:
            entry["error"] = (proc.stderr or proc.stdout)[-2000:]
        done.append(entry)
    return done


def companion_targets(entry: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, figure, met) of a companion's result."""
    result = entry["result"]
    if "meta" in result:  # bench_prefect.py, bench_store.py
        return [(t["name"].strip(), t["detail"], t["met"]) for t in result["meta"]["targets"]]
    if "best" in result:  # bench_one_by_one.py
        return one_by_one_targets(result)
    targets, out = result["targets"], []
    create = result["create"]
    out.append((f"`POST /transactions` >= {targets['create_requests_per_s']:,}/s "
                f"(concurrency {create['concurrency']})",
                f"{create['requests_per_s']:,.0f}/s, p99 {create['p99_ms']:.1f} ms"
                + (f" (best of {len(result['create_runs'])} runs; median "
                   f"{result['create_median_per_s']:,.0f}/s)" if "create_runs" in result else ""),
                create["requests_per_s"] >= targets["create_requests_per_s"]))
    for key in ("summary", "summary_sequential"):
        r = result[key]
        out.append((f"`GET /reports/summary` p99 < {targets['summary_p99_ms']} ms at "
                    f"{result['transactions']:,} rows (concurrency {r['concurrency']})",
                    f"p99 {r['p99_ms']:.1f} ms, p50 {r['p50_ms']:.1f} ms, "
                    f"{r['requests_per_s']:,.0f}/s",
                    r["p99_ms"] < targets["summary_p99_ms"]))
    return out


def one_by_one_targets(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The issue's "one-by-one start_or_resume and complete_stage at least 3x faster than
    now", now being the code it was filed against, measured in the same run."""
    then, mine = result["best"][result["against"]], result["best"]["this tree"]
    floor = result["best"]["sqlite3 floor"]
    old_floor = result["best"].get(f"sqlite3 floor ({result['against']})", {})
    out = []
    for key, name in (("intake_per_s", "`start_or_resume`"),
                      ("complete_stage_per_s", "`complete_stage`")):
        ratio = mine[key] / then[key]
        figure = f"{mine[key]:,.0f} / {then[key]:,.0f}/s = {ratio:.2f}x"
        if key in floor:  # older results measured the floor of the intake only
            figure += (f" (the bare driver, same statements, a commit per call: "
                       f"{floor[key]:,.0f}/s = {floor[key] / then[key]:.2f}x")
            if key in old_floor:
                figure += (f"; {result['against']}'s own statements and schema, bare: "
                           f"{old_floor[key]:,.0f}/s")
            figure += ")"
        out.append((f"one by one, {name} >= 3x {result['against']} (N = {result['n']:,})",
                    figure, ratio >= 3))
    return out


def render_companions(companions: list[dict[str, Any]]) -> str:
    if not companions:
        return ""
    lines = ["", "## The Prefect layer, the store, the one-by-one paths and the HTTP API "
             "(the same run, after the comparison)", ""]
    for entry in companions:
        lines += [f"### {entry['title']}", "",
                  f"`{entry['command']}` ({entry['seconds']:,.0f} s)", ""]
        if "result" not in entry:
            lines += [f"Failed (exit code {entry['exit_code']}):", "", "```",
                      entry["error"].strip(), "```", ""]
            continue
        lines += ["| target | figure | |", "|---|---|---|"]
        lines += [f"| {name} | {figure} | {'met' if met else '**missed**'} |"
                  for name, figure, met in companion_targets(entry)]
        lines.append("")
    return "\n".join(lines)


def notes(results: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    out = [
        "Notes:",
        "",
        "* The same payloads (`bench_store.payload`), the same outcome pattern "
        "(`bench/compare_workload.py`) and the same attempts on both sides (checked); "
        "a fresh SQLite file per measurement; setup (schema, migrations) is not timed.",
        "* rpa-tracker stores no payload and no fingerprint itself: its deduplication "
        "strategy (`KeyFieldDedup` in the driver) keeps both in a table of its own, in the "
        "tracker's session, so that both sides store the same things.",
        "* rpa-tracker's run reads `get_pending_stages` into plain tuples before recording: "
        "iterating its ORM objects after the first commit would reload each one.",
    ]
    skipped = [r["n"] for r in results if "rpa" not in r]
    if skipped:
        out.append(
            f"* rpa-tracker was not run at N = {', '.join(f'{n:,}' for n in skipped)} "
            f"(--rpa-max-n {args.rpa_max_n:,})."
        )
    unshipped = [r["n"] for r in results if "rpa" in r and "rpa_shipped" not in r]
    if unshipped:
        out.append(
            f"* rpa-tracker as shipped was not run at N = "
            f"{', '.join(f'{n:,}' for n in unshipped)} "
            f"(--rpa-shipped-max-n {args.rpa_shipped_max_n:,})."
        )
    no_stage = [r["n"] for r in results if "stage" not in r]
    if no_stage:
        out.append(
            f"* This project's one-by-one variant was not run at N = "
            f"{', '.join(f'{n:,}' for n in no_stage)} (--stage-max-n {args.stage_max_n:,})."
        )
    largest = max(results, key=lambda r: r["n"])
    million = 1_000_000
    if largest["n"] * len(w.PLATFORMS) < million:
        rate = stages_per_s(largest["batch"], "total")
        out.append(
            f"* 1,000,000 stages (N = {million // len(w.PLATFORMS) + 1:,}) were not measured: "
            f"at the N = {largest['n']:,} whole-workload rate of the batch variant "
            f"({_rate(rate)}) they would take about {million / rate / 60:,.0f} min "
            "(the default `--sizes 1000,10000,100000,333334` runs them)."
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
