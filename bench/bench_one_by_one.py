"""One-by-one paths against an earlier revision of this project and against SQLite's floor,
in the same run: ``start_or_resume`` per item, then ``claim`` + ``start_attempt`` +
``complete_stage`` per stage, SQLite file, the same payloads.

A machine that is twice as slow today halves every absolute figure; the ratios to the
earlier revision (same machine, same minute, alternated) and to the floor do not move. The
floor replays the very statements one ``start_or_resume`` of a tree executes (on its schema,
indexes and triggers included) through the bare ``sqlite3`` driver, one committed
transaction per item: what a durable item-at-a-time intake costs before any Python of ours;
and likewise the statements of one ``complete_stage`` (a started first stage succeeds, the
second becomes runnable), for the first stage of each item.
With ``--against``, each tree has its own floor: the earlier revision's schema did less per
item (fewer indexes, no counts kept by triggers).

Usage:
    .venv/bin/python bench/bench_one_by_one.py                      # this tree and the floor
    .venv/bin/python bench/bench_one_by_one.py --against 4dbeea5    # + an earlier revision
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uuid_utils

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "one-by-one.json"


def measure(tree: str, n: int, workdir: str) -> dict[str, Any]:
    """In a child process: the rates of ``tree``'s tracking package (whatever its age: only
    the API every revision has is used)."""
    tracking, engine, tracker = _open(tree, f"{workdir}/one.db")
    ExecutionResult = tracking.ExecutionResult
    t0 = time.perf_counter()
    for p in _payloads(n):
        tracker.start_or_resume("ONE", p, source="bench")
    intake = time.perf_counter() - t0
    start = record = claim = 0.0
    while True:
        t0 = time.perf_counter()
        batch = tracker.claim("ONE", "A", owner="w", limit=500)
        claim += time.perf_counter() - t0
        if not batch:
            break
        for s in batch:
            t0 = time.perf_counter()
            if hasattr(tracker, "start_attempt"):  # older revisions count at the claim
                tracker.start_attempt(s.uuid, "A", s.stage, owner="w")
            t1 = time.perf_counter()
            tracker.complete_stage(s.uuid, "A", ExecutionResult(0), stage=s.stage, owner="w")
            start, record = start + t1 - t0, record + time.perf_counter() - t1
    return {"intake_per_s": n / intake, "complete_stage_per_s": n / record,
            "run_per_s": n / (claim + start + record)}


def floor(tree: str, n: int, workdir: str) -> dict[str, Any]:
    """In a child process: the statements of one ``start_or_resume`` replayed ``n`` times
    through the bare driver, each item committed alone; then those of one ``complete_stage``
    (a claimed, started first stage) replayed for each of the ``n`` items the same way."""
    tracking, engine, tracker = _open(tree, f"{workdir}/floor.db")
    intake, started = _statements_of(
        engine, lambda: tracker.start_or_resume("ONE", _payloads(1)[0]))
    first = started[0]  # the new transaction's uuid
    # The driver's connection as the engine set it up (the project's pragmas: WAL,
    # synchronous, cache, checkpoint interval, foreign keys), used bare.
    raw = engine.raw_connection()
    db = raw.driver_connection

    t0 = time.perf_counter()
    for _ in range(n):
        new = str(uuid_utils.uuid7())  # as this project makes them (they sort by time)
        db.execute("BEGIN IMMEDIATE")
        for stmt, params, many in intake:
            if many:
                db.executemany(stmt, [_swap(p, {first: new}) for p in params])
            else:
                values = _swap(params, {first: new})
                if stmt.startswith("INSERT INTO tx_process"):
                    values[2] = new  # the fingerprint column: unique too
                db.execute(stmt, values)
        db.execute("COMMIT")
    intake_rate = n / (time.perf_counter() - t0)
    (items,) = db.execute("SELECT count(*) FROM tx_process").fetchone()
    if items != n + 1:
        raise SystemExit(f"start_or_resume replay: {items} transactions, not {n + 1}")
    raw.close()
    return {"intake_per_s": intake_rate,
            "complete_stage_per_s": _complete_floor(tracking, tracker, engine, n)}


def _complete_floor(tracking: Any, tracker: Any, engine: Any, n: int) -> float:
    """``complete_stage``'s statements (first stage done, the second made runnable) replayed
    through the bare driver for the first stage of ``n`` items, each committed alone."""
    claimed = []
    while len(claimed) < n + 1:  # not timed: reserve and start every first stage
        batch = tracker.claim("ONE", "A", owner="w", limit=500)
        if not batch:
            break
        for s in batch:
            if hasattr(tracker, "start_attempt"):  # older revisions count at the claim
                tracker.start_attempt(s.uuid, "A", s.stage, owner="w")
        claimed += batch
    raw = engine.raw_connection()
    db = raw.driver_connection
    ids = {u: (a, b) for u, a, b in db.execute(
        "SELECT s.uuid, s.id, n.id FROM tx_stage s JOIN tx_stage n ON n.uuid = s.uuid "
        "AND n.platform = 'B' WHERE s.platform = 'A'")}
    # The captured stage has the largest ids: no other value of its statements equals them.
    last = max(claimed, key=lambda s: ids[s.uuid][0])
    statements, _ = _statements_of(engine, lambda: tracker.complete_stage(
        last.uuid, "A", tracking.ExecutionResult(0), stage=last.stage, owner="w"))
    a, b = ids[last.uuid]
    others = [s.uuid for s in claimed if s.uuid != last.uuid][:n]
    t0 = time.perf_counter()
    for uuid in others:
        swap = {last.uuid: uuid, a: ids[uuid][0], b: ids[uuid][1]}
        db.execute("BEGIN IMMEDIATE")
        for stmt, params, many in statements:
            if many:
                db.executemany(stmt, [_swap(p, swap) for p in params])
            else:
                db.execute(stmt, _swap(params, swap)).fetchall()  # the locking reads' rows
        db.execute("COMMIT")
    rate = len(others) / (time.perf_counter() - t0)
    # A replay that matched no row would be fast and wrong: every first stage is done, and
    # every second one runnable, as complete_stage leaves them.
    done, runnable = db.execute(
        "SELECT sum(platform = 'A' AND state = 'COMPLETED'), "
        "sum(platform = 'B' AND next_attempt_at IS NOT NULL) FROM tx_stage").fetchone()
    if done != len(others) + 1 or runnable != done:
        raise SystemExit(f"complete_stage replay: {done} first stages completed, {runnable} "
                         f"second ones runnable, of {len(others) + 1}")
    raw.close()
    engine.dispose()
    return rate


def _statements_of(engine: Any, call: Callable[[], Any]
                   ) -> tuple[list[tuple[str, Any, bool]], Any]:
    """The statements ``call`` runs on ``engine`` (SQL, parameters, executemany or not),
    without the transaction's BEGIN (a replay has its own), and what it returned."""
    from sqlalchemy import event

    seen: list[tuple[str, Any, bool]] = []

    def watch(_c: Any, _cur: Any, stmt: str, params: Any, _ctx: Any, many: bool) -> None:
        seen.append((stmt, params, many))

    # A watched engine runs even the driver's statements through SQLAlchemy: all are seen.
    event.listen(engine, "before_cursor_execute", watch)
    try:
        returned = call()
    finally:
        event.remove(engine, "before_cursor_execute", watch)
    return [s for s in seen if not s[0].startswith("BEGIN")], returned


def _swap(params: Any, new: dict[Any, Any]) -> list[Any]:
    """The parameters with each value that ``new`` names replaced (an item's uuid, ids)."""
    return [new.get(v, v) if isinstance(v, str | int) else v for v in params]


def _open(tree: str, path: str) -> tuple[Any, Any, Any]:
    """``tree``'s tracking package, an engine on a new SQLite file at ``path`` (migrated), and
    a tracker of the benchmark's process on it."""
    _import_tracking_of(tree)
    import tracking

    engine = tracking.connect(f"sqlite:///{path}", migrate=True)
    return tracking, engine, tracking.Tracker(engine, processes=[_process(tracking)])


def _import_tracking_of(tree: str) -> None:
    """Import ``tree``'s tracking package, not the one this venv has installed (which would
    measure this tree twice without a word)."""
    sys.path.insert(0, tree)
    import tracking

    if not Path(tracking.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"imported {tracking.__file__}, not the tracking package of {tree}")


def _process(tracking: Any) -> Any:
    return tracking.Process("ONE", dedup=tracking.KeyFields("id"), platforms=[
        tracking.Platform(code, order=k + 1, retry=tracking.RetryPolicy(max_attempts=3))
        for k, code in enumerate("ABC")])


def _payloads(n: int) -> list[dict[str, Any]]:
    # Not bench_store.payload: that module imports this tree's tracking at its top.
    return [{"id": f"I{i:07d}", "customer": f"C{i % 997}", "amount": i % 5000, "note": "x" * 40}
            for i in range(n)]


def _child(kind: str, tree: str, n: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--tree", tree,
                          "--n", str(n)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {kind} of {tree} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _revision(rev: str) -> str:
    """The commit ``rev`` names in this repository, or a clear error."""
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                            f"{rev}^{{commit}}"], capture_output=True, text=True)
    if found.returncode != 0:
        raise SystemExit(f"--against {rev!r}: no such commit in {ROOT} (a shallow clone "
                         "may lack it: git fetch --unshallow)")
    return found.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="items per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--against", default=None,
                        help="a git revision of this project to measure alternately")
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 300, once")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--child", choices=("measure", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats = 300, 1
    if args.n < 1 or args.repeats < 1:
        parser.error("--n and --repeats must be positive")
    if args.child:
        with tempfile.TemporaryDirectory(prefix="bench-one-") as workdir:
            child = measure if args.child == "measure" else floor
            print(json.dumps(child(args.tree, args.n, workdir)))
        return 0
    trees = {"this tree": str(ROOT)}
    commit = _revision(args.against) if args.against else None
    with tempfile.TemporaryDirectory(prefix="bench-one-") as workdir:
        old = Path(workdir) / "against"
        if commit:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                            str(old), commit], check=True)
            trees[args.against] = str(old)
        # Each tree's floor: its own statements on its own schema (indexes, triggers).
        floors = {f"sqlite3 floor{'' if name == 'this tree' else f' ({name})'}": tree
                  for name, tree in trees.items()}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*trees, *floors]}
        try:
            for _ in range(args.repeats):  # alternated: a busy minute hurts every side alike
                for name, tree in trees.items():
                    runs[name].append(_child("measure", tree, args.n))
                for name, tree in floors.items():
                    runs[name].append(_child("floor", tree, args.n))
        finally:
            if commit:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(old)], check=False)
    best = {name: {k: max(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    print(f"One by one, SQLite, N = {args.n:,}, best of {args.repeats} (alternated):")
    columns = {"intake_per_s": "start_or_resume/s", "complete_stage_per_s": "complete_stage/s",
               "run_per_s": "claim+start+complete/s"}
    print(f"  {'':<24}" + "".join(f"{title:>24}" for title in columns.values()))
    for name, b in best.items():
        print(f"  {name:<24}" + "".join(
            f"{b[k]:>24,.0f}" if k in b else f"{'-':>24}" for k in columns))
    mine = best["this tree"]
    for name, b in best.items():
        if name != "this tree":
            print(f"  this tree / {name}: " + ", ".join(
                f"{columns[k]} {mine[k] / b[k]:.2f}x" for k in columns if k in b))
    for name in trees:
        own = best[f"sqlite3 floor{'' if name == 'this tree' else f' ({name})'}"]
        print(f"  {name}: " + ", ".join(
            f"{columns[k]} at {best[name][k] / own[k]:.2f}" for k in own)
            + " of its own floor (its statements, bare)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"n": args.n, "repeats": args.repeats,
                                       "against": args.against, "runs": runs, "best": best},
                                      indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
