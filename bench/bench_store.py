"""Benchmark of the tracking store: intake, claim, complete_stage and reports at N transactions.

For each size N (default 10,000 and 100,000) a fresh database gets N transactions of a process
with 3 platforms (A, B, C; one stage each, so 3 stages per transaction), then the script
measures:

* intake, bulk: ``Tracker.start_many`` in chunks of ``--chunk`` (default 1,000) for the first
  N - S transactions;
* intake, one by one: ``Tracker.start_or_resume`` for the last S (``--one-by-one``, default
  5,000), so each call runs against a table that already holds about N transactions;
* re-submitting duplicates one by one (the dedup path: nothing is written);
* claim latency: ``--claims`` (default 20) calls of ``claim(limit=100)`` on platform A, each by
  a different owner (the store never hands a stage back to the owner that last attempted it);
  plus the latency of a claim that finds nothing (platform C);
* ``complete_stage`` rate: every claimed stage completed with ``owner=`` and error code 0,
  then a sample of unclaimed runnable stages completed without an owner, then a small sample
  of business and system errors (so that ``top_errors`` has rows to group);
* report query time: ``Reports.summary_by_state``, ``stage_summary_by_platform`` and
  ``top_errors`` over a window that covers everything (median of ``--report-repeats`` runs).

Targets (the issues): claim latency at the largest N within 2x of the smallest N; one-by-one
intake >= 2,000/s; complete_stage >= 2,000/s (the speed issue's figures; an earlier issue
asked 1,000/s).

Usage:
    .venv/bin/python bench/bench_store.py                      # SQLite, N = 10k and 100k
    .venv/bin/python bench/bench_store.py --quick              # smoke run, N = 2,000
    .venv/bin/python bench/bench_store.py \\
        --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/bench_store.py --sizes 10000 --profile   # cProfile hot spots

With ``--database-url postgresql://...`` the script creates a database of its own
(``bench_<random>``) on that server for each N and drops it afterwards; the database named in
the URL is only used to connect. Results are printed as a table and written as JSON to
``bench/results/store-<sqlite|postgresql>.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform as platform_mod
import pstats
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.engine import Engine, make_url  # noqa: E402

from tests.pg import fresh_database as fresh_postgres_database  # noqa: E402
from tracking import (  # noqa: E402
    ExecutionResult,
    KeyFields,
    Platform,
    Process,
    Reports,
    Tracker,
    connect,
)
from tracking.db import normalise_url  # noqa: E402

PROCESS = "BENCH"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CLAIM_LIMIT = 100
# The speed issue's one-by-one rates (an earlier issue asked 1,000/s) and claim latency kept
# flat in N.
TARGET_INTAKE_PER_S = 2_000
TARGET_COMPLETE_PER_S = 2_000
TARGET_CLAIM_RATIO = 2.0


def bench_process() -> Process:
    return Process(
        PROCESS,
        platforms=[Platform("A", order=1), Platform("B", order=2), Platform("C", order=3)],
        dedup=KeyFields("id"),
        description="benchmark process",
    )


def payload(i: int) -> dict[str, Any]:
    return {
        "id": f"BENCH-{i:08d}",
        "customer": f"C{i % 5000:05d}",
        "amount": round(10 + (i % 997) * 1.37, 2),
        "lines": [{"sku": f"SKU{i % 311}", "qty": 1 + i % 4}],
    }


# -- measuring ---------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (``values`` need not be sorted)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def latency_stats(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "count": len(ms),
        "p50_ms": statistics.median(ms) if ms else float("nan"),
        "p95_ms": percentile(ms, 95),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
    }


@dataclass
class Timed:
    """Per-call latencies of a phase (wall clock and this process's CPU time) and its wall time.

    CPU time counts user + system time of this process only: it leaves out waiting for the
    disk, the database server and other processes, so it shows what a call costs on an idle
    machine (the targets are judged on wall-clock figures).
    """

    latencies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    wall: float = 0.0
    items: int = 0

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        w, c = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        self.cpu.append(time.process_time() - c)
        self.latencies.append(time.perf_counter() - w)
        return result

    @contextmanager
    def running(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - start

    def summary(self) -> dict[str, Any]:
        cpu = sum(self.cpu)
        return {
            "items": self.items,
            "calls": len(self.latencies),
            "seconds": self.wall,
            "per_s": self.items / self.wall if self.wall else float("nan"),
            "cpu_seconds": cpu,
            "per_cpu_s": self.items / cpu if cpu else float("nan"),
            **latency_stats(self.latencies),
            "cpu_p50_ms": statistics.median(self.cpu) * 1000 if self.cpu else float("nan"),
        }


class Profiler:
    """Optional cProfile around selected phases (``--profile``)."""

    def __init__(self, enabled: bool, out_dir: Path, label: str) -> None:
        self.enabled = enabled
        self.out_dir = out_dir
        self.label = label
        self.reports: dict[str, str] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        prof = cProfile.Profile()
        prof.enable()
        try:
            yield
        finally:
            prof.disable()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / f"profile-{self.label}-{name}.pstats"
            prof.dump_stats(path)
            buf = io.StringIO()
            stats = pstats.Stats(prof, stream=buf).strip_dirs()
            stats.sort_stats("tottime").print_stats(18)
            self.reports[name] = buf.getvalue()


# -- databases ---------------------------------------------------------------------------------


@contextmanager
def fresh_database(base_url: str | None, workdir: Path, n: int) -> Iterator[str]:
    """A URL of an empty database for one size; removed afterwards."""
    if base_url is None or make_url(normalise_url(base_url)).get_backend_name() == "sqlite":
        if base_url is None:
            path = workdir / f"bench-{n}.db"
            yield f"sqlite:///{path}"
        else:
            path = Path(make_url(base_url).database or "")
            if path.exists():
                raise SystemExit(f"{path} exists: give the path of a new SQLite file")
            yield base_url
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    if make_url(normalise_url(base_url)).get_backend_name() != "postgresql":
        raise SystemExit(f"unsupported database URL {base_url!r}")
    with fresh_postgres_database(base_url, "bench") as url:
        yield url


def database_size(engine: Engine, url: str) -> int | None:
    if engine.dialect.name == "sqlite":
        path = make_url(url).database or ""
        return sum(
            os.path.getsize(f"{path}{s}") for s in ("", "-wal") if os.path.exists(f"{path}{s}")
        )
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()


# -- one size ----------------------------------------------------------------------------------


def run_size(n: int, url: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    result: dict[str, Any] = {"n": n}
    t0 = time.perf_counter()
    engine = connect(url, migrate=True)
    result["migrate_seconds"] = time.perf_counter() - t0
    tracker = Tracker(engine, processes=[bench_process()])
    reports = Reports(engine)
    prof = Profiler(args.profile, RESULTS_DIR, f"{engine.dialect.name}-{n}")
    window_start = datetime.now(UTC) - timedelta(minutes=1)

    one_by_one = min(args.one_by_one, n)
    bulk_count = n - one_by_one
    uuids: list[str] = []

    # Intake, bulk: the first N - S transactions.
    bulk = Timed()
    with bulk.running():
        for lo in range(0, bulk_count, args.chunk):
            batch = [payload(i) for i in range(lo, min(lo + args.chunk, bulk_count))]
            intakes = bulk.call(tracker.start_many, PROCESS, batch, source="bench")
            uuids.extend(i.uuid for i in intakes)
            bulk.items += len(batch)
            if len(bulk.latencies) % 20 == 0:
                log(f"  start_many: {bulk.items:,}/{bulk_count:,}")
    result["intake_bulk"] = {**bulk.summary(), "chunk": args.chunk}
    log(f"  start_many: {bulk.items:,} in {bulk.wall:.1f}s")

    # Intake, one by one: the last S, against a table that already holds N - S.
    single = Timed()
    with prof.phase("start_or_resume"), single.running():
        for i in range(bulk_count, n):
            p = payload(i)
            uuid, is_new = single.call(tracker.start_or_resume, PROCESS, p, source="bench")
            assert is_new
            uuids.append(uuid)
    single.items = one_by_one
    result["intake_one_by_one"] = single.summary()
    log(f"  start_or_resume: {one_by_one:,} in {single.wall:.1f}s")

    # Duplicates: the dedup path (a read, nothing written).
    dups = Timed()
    dups.items = min(args.duplicates, n)
    with dups.running():
        for k in range(dups.items):
            i = (k * 7919) % n
            uuid, is_new = dups.call(tracker.start_or_resume, PROCESS, payload(i), source="bench")
            assert not is_new and uuid == uuids[i]
    result["intake_duplicates"] = dups.summary()

    # Claim latency: limit=100 on platform A, a different owner each time.
    claims = Timed()
    claimed: list[tuple[str, str]] = []
    with prof.phase("claim"), claims.running():
        for k in range(args.claims):
            owner = f"bench-run-{k}"
            stages = claims.call(tracker.claim, PROCESS, "A", owner=owner, limit=CLAIM_LIMIT)
            claimed.extend((s.uuid, owner) for s in stages)
            claims.items += len(stages)
    result["claim"] = {**claims.summary(), "limit": CLAIM_LIMIT}
    empty = Timed()
    for k in range(5):
        found = empty.call(tracker.claim, PROCESS, "C", owner=f"idle-{k}", limit=CLAIM_LIMIT)
        assert found == []
    result["claim_empty"] = empty.summary()
    log(f"  claim: {args.claims} x limit {CLAIM_LIMIT}, p50 {result['claim']['p50_ms']:.1f} ms")

    # complete_stage of the claimed stages (owner=, code 0).
    done = Timed()
    done.items = len(claimed)
    with prof.phase("complete_stage"), done.running():
        for uuid, owner in claimed:
            done.call(tracker.complete_stage, uuid, "A", 0, owner=owner)
    result["complete_claimed"] = done.summary()

    # complete_stage without a claim: runnable A stages of the newest transactions (the claims
    # above took the oldest).
    claimed_uuids = {u for u, _ in claimed}
    fresh = [u for u in reversed(uuids) if u not in claimed_uuids]
    sample = fresh[: min(args.complete_sample, len(fresh))]
    unclaimed = Timed()
    unclaimed.items = len(sample)
    with unclaimed.running():
        for uuid in sample:
            unclaimed.call(tracker.complete_stage, uuid, "A", 0)
    result["complete_unclaimed"] = unclaimed.summary()

    # A few errors, so that top_errors groups something (timed, not a target).
    errors = fresh[len(sample) : len(sample) + args.error_sample]
    failed = Timed()
    failed.items = len(errors)
    with failed.running():
        for k, uuid in enumerate(errors):
            outcome = (
                ExecutionResult(12, "customer has open invoices")
                if k % 2
                else ExecutionResult(-5, "platform timeout")
            )
            failed.call(tracker.complete_stage, uuid, "A", outcome)
    result["complete_errors"] = failed.summary()
    log(f"  complete_stage: {done.items + unclaimed.items + failed.items:,} stages")

    # Reports over a window that covers everything.
    window_end = datetime.now(UTC) + timedelta(minutes=1)
    result["reports"] = {}
    queries: dict[str, Callable[[], list[Any]]] = {
        "summary_by_state": lambda: reports.summary_by_state(window_start, window_end),
        "stage_summary_by_platform": lambda: reports.stage_summary_by_platform(
            window_start, window_end
        ),
        "top_errors": lambda: reports.top_errors(window_start, window_end),
    }
    for name, query in queries.items():
        timed = Timed()
        rows: list[Any] = []
        for _ in range(args.report_repeats):
            rows = timed.call(query)
        result["reports"][name] = {**timed.summary(), "rows": len(rows)}
        if name == "summary_by_state":
            total = sum(r.count for r in rows)
            assert total == n, (total, n)
    result["database_bytes"] = database_size(engine, url)
    result["total_seconds"] = time.perf_counter() - t0
    if prof.reports:
        result["profile"] = prof.reports
    engine.dispose()
    return result


# -- output ------------------------------------------------------------------------------------


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}/s"


def _fmt_ms(x: float) -> str:
    return f"{x:,.1f} ms" if x < 100 else f"{x:,.0f} ms"


def _fmt_load(load: list[float] | None) -> str:
    return "n/a" if not load else " ".join(f"{x:.2f}" for x in load)


def render(results: list[dict], meta: dict) -> str:
    cols = [f"N = {r['n']:,}" for r in results]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn: Callable[[dict], str]) -> None:
        rows.append((label, [fn(r) for r in results]))

    def rate(key: str, figure: str = "per_s") -> Callable[[dict], str]:
        return lambda r: _fmt_rate(r[key][figure])

    def p50_p95(key: str) -> Callable[[dict], str]:
        return lambda r: f"{_fmt_ms(r[key]['p50_ms'])} / {_fmt_ms(r[key]['p95_ms'])}"

    add("intake one by one (start_or_resume)", rate("intake_one_by_one"))
    add("  calls (the last S of N)", lambda r: f"{r['intake_one_by_one']['items']:,}")
    add("  latency p50 / p95", p50_p95("intake_one_by_one"))
    add("  rate by CPU time", rate("intake_one_by_one", "per_cpu_s"))
    add("intake bulk (start_many)", rate("intake_bulk"))
    add(
        "  transactions / chunk",
        lambda r: f"{r['intake_bulk']['items']:,} / {r['intake_bulk']['chunk']:,}",
    )
    add("  chunk latency p50 / p95", p50_p95("intake_bulk"))
    add("duplicate re-submission (one by one)", rate("intake_duplicates"))
    add(f"claim limit={CLAIM_LIMIT}: latency p50 / p95", p50_p95("claim"))
    add("  CPU time p50", lambda r: _fmt_ms(r["claim"]["cpu_p50_ms"]))
    add(
        "  claims x stages claimed",
        lambda r: "{} x {}".format(
            r["claim"]["calls"], r["claim"]["items"] // max(1, r["claim"]["calls"])
        ),
    )
    add("claim, nothing runnable: p50", lambda r: _fmt_ms(r["claim_empty"]["p50_ms"]))
    add("complete_stage, claimed (owner=)", rate("complete_claimed"))
    add("  calls", lambda r: f"{r['complete_claimed']['items']:,}")
    add("  latency p50 / p95", p50_p95("complete_claimed"))
    add("  rate by CPU time", rate("complete_claimed", "per_cpu_s"))
    add("complete_stage, unclaimed", rate("complete_unclaimed"))
    add("  calls", lambda r: f"{r['complete_unclaimed']['items']:,}")
    add("  rate by CPU time", rate("complete_unclaimed", "per_cpu_s"))
    add("complete_stage, errors (half each kind)", rate("complete_errors"))
    for name in ("summary_by_state", "stage_summary_by_platform", "top_errors"):
        add(f"report {name} p50", lambda r, name=name: _fmt_ms(r["reports"][name]["p50_ms"]))
    add(
        "database size",
        lambda r: "-" if r["database_bytes"] is None else f"{r['database_bytes'] / 1e6:,.1f} MB",
    )
    add("total time for this N", lambda r: f"{r['total_seconds']:,.1f} s")

    width0 = max(len(label) for label, _ in rows)
    widths = [max(len(c), *(len(v[i]) for _, v in rows)) for i, c in enumerate(cols)]
    lines = [
        f"Tracking store benchmark: {meta['database']} ({meta['database_version']}), "
        f"{meta['cpus']} CPUs, Python {meta['python']}, SQLAlchemy {meta['sqlalchemy']}",
        f"load average at start: {_fmt_load(meta['load_average_at_start'])} "
        "(other work on the machine makes the figures noisier)",
        "",
        "  ".join([" " * width0, *(c.rjust(w) for c, w in zip(cols, widths, strict=True))]),
        "  ".join(["-" * width0, *("-" * w for w in widths)]),
    ]
    for label, values in rows:
        lines.append(
            "  ".join(
                [label.ljust(width0), *(v.rjust(w) for v, w in zip(values, widths, strict=True))]
            )
        )
    lines.append("")
    lines.append(
        "Intake: the first N - S transactions go through start_many, the last S one by one "
        "through start_or_resume (so each call sees a table of about N)."
    )
    lines.append(
        "Rates are wall clock. 'By CPU time' counts only this process's CPU time (what the "
        "call costs without waiting on the disk, the server or other processes)."
    )
    lines.append("")
    lines.append("Targets (wall clock):")
    for t in meta["targets"]:
        lines.append(f"  [{'MET ' if t['met'] else 'MISS'}] {t['name']}: {t['detail']}")
    return "\n".join(lines)


def check_targets(results: list[dict]) -> list[dict[str, Any]]:
    targets = []
    if len(results) >= 2:
        small, large = results[0], results[-1]
        ratio = large["claim"]["p50_ms"] / small["claim"]["p50_ms"]
        targets.append(
            {
                "name": f"claim p50 at N={large['n']:,} within {TARGET_CLAIM_RATIO:g}x of "
                f"N={small['n']:,}",
                "met": ratio <= TARGET_CLAIM_RATIO,
                "detail": f"{large['claim']['p50_ms']:.1f} ms vs {small['claim']['p50_ms']:.1f} ms "
                f"= {ratio:.2f}x",
                "value": ratio,
            }
        )
    for r in results:
        rate = r["intake_one_by_one"]["per_s"]
        targets.append(
            {
                "name": f"one-by-one intake >= {TARGET_INTAKE_PER_S:,}/s at N={r['n']:,}",
                "met": rate >= TARGET_INTAKE_PER_S,
                "detail": _fmt_rate(rate),
                "value": rate,
            }
        )
        for key, label in (("complete_claimed", "claimed"), ("complete_unclaimed", "unclaimed")):
            rate = r[key]["per_s"]
            targets.append(
                {
                    "name": f"complete_stage ({label}) >= {TARGET_COMPLETE_PER_S:,}/s at "
                    f"N={r['n']:,}",
                    "met": rate >= TARGET_COMPLETE_PER_S,
                    "detail": _fmt_rate(rate),
                    "value": rate,
                }
            )
    return targets


def metadata(engine_url: str) -> dict[str, Any]:
    engine = sa.create_engine(engine_url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                version = f"SQLite {sqlite3.sqlite_version}"
            else:
                version = conn.exec_driver_sql("SHOW server_version").scalar()
                version = f"PostgreSQL {version}"
        name = engine.dialect.name
    finally:
        engine.dispose()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "database": name,
        "database_version": version,
        "cpus": os.cpu_count(),
        "python": platform_mod.python_version(),
        "sqlalchemy": sa.__version__,
        "machine": platform_mod.platform(),
        "git_commit": commit,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="10000,100000", help="comma-separated N (default 10000,100000)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N=2000 and smaller samples"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="default: a SQLite file in a temporary directory; with "
        "postgresql://... a bench_<random> database is created and dropped",
    )
    parser.add_argument(
        "--one-by-one",
        type=int,
        default=5000,
        help="transactions taken in one by one (the last S of N; default 5000)",
    )
    parser.add_argument("--chunk", type=int, default=1000, help="start_many chunk size")
    parser.add_argument(
        "--duplicates",
        type=int,
        default=1000,
        help="duplicate re-submissions to time (default 1000)",
    )
    parser.add_argument(
        "--claims", type=int, default=20, help=f"claims of limit={CLAIM_LIMIT} to time (default 20)"
    )
    parser.add_argument(
        "--complete-sample",
        type=int,
        default=2000,
        help="unclaimed stages completed without owner (default 2000)",
    )
    parser.add_argument(
        "--error-sample",
        type=int,
        default=200,
        help="stages completed with an error code (default 200)",
    )
    parser.add_argument(
        "--report-repeats", type=int, default=5, help="runs of each report query (default 5)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile start_or_resume, claim and complete_stage; print hot spots",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file (default bench/results/store-<database>.json)",
    )
    args = parser.parse_args(argv)

    if args.quick:
        sizes = [2000]
        args.one_by_one = min(args.one_by_one, 500)
        args.duplicates = min(args.duplicates, 200)
        args.claims = min(args.claims, 5)
        args.complete_sample = min(args.complete_sample, 300)
        args.error_sample = min(args.error_sample, 40)
    else:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    if not sizes or min(sizes) < 1 or args.chunk < 1:
        parser.error("sizes and --chunk must be positive")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="bench-store-"))
    results = []
    meta: dict[str, Any] = {}
    try:
        for n in sizes:
            with fresh_database(args.database_url, workdir, n) as url:
                if not meta:
                    meta = metadata(normalise_url(url))
                log(f"N = {n:,} on {meta['database']}")
                results.append(run_size(n, url, args, log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    meta["targets"] = check_targets(results)
    meta["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for r in results:
        for name, text in r.get("profile", {}).items():
            print(f"\n== cProfile N={r['n']:,} {name} (by own time) ==\n{text}")
    print(render(results, meta))

    output = args.output or RESULTS_DIR / f"store-{meta['database']}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    print(f"\nJSON: {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
