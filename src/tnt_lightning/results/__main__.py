"""``python -m tnt_lightning.results doctor|bench``: check or repair a results store; time it.

python -m tnt_lightning.results doctor [--results-dir DIR] [--repair]
python -m tnt_lightning.results bench [--sizes 1000 10000 100000] [--ops 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from .store import RESULTS_FILE, ResultsStore, write_atomic


def _default_results_dir() -> Path:
    return Path(os.environ.get("TNT_ROOT", os.getcwd())) / "results"


def doctor(results_dir: Path, repair: bool) -> int:
    """List what is wrong with a store; with ``repair`` fix it without losing a line. Exit 1 if
    anything was wrong and left unrepaired."""
    store = ResultsStore(results_dir)
    if not store.path.exists():
        print(f"no results file at {store.path}")
        return 0
    damaged = store.damaged_lines()
    stale = store.stale_claims()
    temps = list(store.root.rglob(".*.tmp"))
    lines, experiments = len(store.records(history=True)), len(store.records())
    print(f"{store.path}: {lines} record line(s), {experiments} experiment(s)")
    for line in damaged:
        print(f"  line {line.number}: {line.reason}")
    print(
        f"  {len(damaged)} damaged or foreign line(s), {len(stale)} stale claim(s), "
        f"{len(temps)} temporary file(s)"
    )
    if not repair:
        if damaged or stale or temps:
            print("repair with: python -m tnt_lightning.results doctor --repair")
            return 1
        return 0
    with store.locked():
        if damaged:
            numbers = {line.number for line in damaged}
            aside = store.path.with_name(f"{RESULTS_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            kept, moved = [], []
            with open(store.path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    (moved if number in numbers else kept).append(raw.rstrip(b"\n") + b"\n")
            aside.write_bytes(b"".join(moved))
            mode = store.path.stat().st_mode & 0o777
            write_atomic(store.path, b"".join(kept).decode("utf-8", errors="replace"))
            os.chmod(store.path, mode)
            print(f"  moved {len(moved)} line(s) to {aside}")
        for path in [*stale, *temps]:
            path.unlink(missing_ok=True)
        print(f"  index rebuilt: {store.rebuild_index()} experiment(s)")
    return 0


def _record(i: int) -> dict:
    """A record of realistic size (~3 kB, mostly its config)."""
    method = {"name": "topk", "options": list(range(40))}
    config = {"task": "eval", "seed": i, "method": method, "pad": "x" * 2500}
    return {
        "run_id": f"r{i:08d}",
        "task": "eval",
        "status": "ok",
        "config_key": f"{i:016x}",
        "config_key_version": 2,
        "config": config,
        "metrics": {"acc1": 50.0, "gflops": 1.0},
    }


def bench(sizes: list[int], ops: int) -> int:
    """Median time of an append, a recorded-lookup and a claim/release, at each history size."""
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = ResultsStore(tmp)
            store.check_writable()
            with open(store.path, "w") as f:
                for i in tqdm(range(size), desc=f"history of {size}", leave=False):
                    f.write(json.dumps(_record(i)) + "\n")
            with store.locked():
                store.rebuild_index()
            timings: dict[str, list[float]] = {"append": [], "recorded": [], "claim+release": []}
            for j in range(ops):
                new = _record(size + j)
                start = time.perf_counter()
                store.append(new)
                timings["append"].append(time.perf_counter() - start)
                start = time.perf_counter()
                assert store.recorded("eval", f"{(j * 7919) % size:016x}") is not None
                timings["recorded"].append(time.perf_counter() - start)
                start = time.perf_counter()
                admission = store.begin("eval", f"new{j}", f"run{j}", skip_recorded=True)
                admission.claim.release()
                timings["claim+release"].append(time.perf_counter() - start)
            rows.append((size, {k: statistics.median(v) * 1e3 for k, v in timings.items()}))
    print("| records | append (ms) | recorded? (ms) | claim + release (ms) |")
    print("|---:|---:|---:|---:|")
    for size, ms in rows:
        print(f"| {size:,} | {ms['append']:.2f} | {ms['recorded']:.3f} | {ms['claim+release']:.2f} |")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tnt_lightning.results", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("doctor", help="list damaged lines, stale claims and temporary files")
    check.add_argument("--results-dir", type=Path, default=_default_results_dir())
    check.add_argument("--repair", action="store_true", help="move damaged lines aside, rebuild the index")
    timing = sub.add_parser("bench", help="time the store's operations at several history sizes")
    timing.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    timing.add_argument("--ops", type=int, default=50)
    args = parser.parse_args(argv)
    with contextlib.suppress(BrokenPipeError):
        if args.command == "doctor":
            return doctor(args.results_dir, args.repair)
        return bench(args.sizes, args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
