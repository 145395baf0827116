"""``python -m tnt_lightning.results doctor|bench``: check or repair a results store; time it.

python -m tnt_lightning.results doctor [--results-dir DIR] [--cache-dir DIR] [--repair] [--release KEY]
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
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from .identity import outcome_table
from .store import CLAIM_LOST, RESULTS_FILE, ResultsStore, holder_alive_here
from .tempfiles import process_state, stale_temps, write_atomic


def _default_root() -> Path:
    return Path(os.environ.get("TNT_ROOT", os.getcwd()))


def _describe_claim(holder: dict, stale: bool) -> str:
    where = f"pid {holder.get('pid')} on {holder.get('host')}"
    if (holder.get("slurm") or {}).get("job_id"):
        where += f", SLURM job {holder['slurm']['job_id']}"
    if stale:
        return f"{where}: stale (its job is gone)"
    state = holder_alive_here(holder) and process_state(int(holder["pid"]))
    return f"{where}: held{f' ({state})' if state else ''}"


def _move_aside(store: ResultsStore, numbers: set[int], suffix: str) -> Path:
    """Move the lines ``numbers`` of results.jsonl to ``results.jsonl.<suffix>-<time>`` (call under
    the lock); the file keeps its mode."""
    aside = store.path.with_name(f"{RESULTS_FILE}.{suffix}-{time.strftime('%Y%m%d-%H%M%S')}")
    kept, moved = [], []
    with open(store.path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            (moved if number in numbers else kept).append(raw.rstrip(b"\n") + b"\n")
    with open(aside, "ab") as out:
        out.write(b"".join(moved))
    mode = store.path.stat().st_mode & 0o777
    write_atomic(store.path, b"".join(kept).decode("utf-8", errors="replace"))
    os.chmod(store.path, mode)
    print(f"  moved {len(moved)} line(s) to {aside}")
    return aside


def doctor(
    results_dir: Path, repair: bool, release: Sequence[str] = (), cache_dir: Path | None = None
) -> int:
    """List what is wrong with a store; with ``repair`` fix it without losing a line. Exit 1 if
    anything was wrong and left unrepaired. ``release`` names claims (config keys or claim file
    names) to remove although their job may live (a stopped job); ``cache_dir``: where else to look
    for temporary files of killed writes."""
    store = ResultsStore(results_dir)
    status = 0
    claims = store.claims()
    for path, holder, stale in claims:
        print(f"  claim {path.stem}: {_describe_claim(holder, stale)}")
        if any(name in (path.stem, path.name, path.stem.partition("-")[2]) for name in release):
            holder = store.release_claim(path)
            print(f"  released claim {path.stem} (its job, if it goes on, records {CLAIM_LOST!r})")
    for name in release:
        if not any(name in (p.stem, p.name, p.stem.partition("-")[2]) for p, _, _ in claims):
            print(f"  no claim named {name!r}")
            status = 1
    if not store.path.exists():
        print(f"no results file at {store.path}")
        return status
    with contextlib.suppress(OSError):  # a read-only store is still checked
        store._ensure_index()
    damaged = store.damaged_lines()
    duplicates = store.duplicates()
    disagreements = store.index_disagreements()
    stale = store.stale_claims()
    temps = stale_temps(store.root) + (stale_temps(cache_dir) if cache_dir and cache_dir.is_dir() else [])
    lines, experiments = len(store.records(history=True)), len(store.records())
    print(f"{store.path}: {lines} record line(s), {experiments} experiment(s)")
    for line in damaged:
        print(f"  line {line.number}: {line.reason}")
    for number, record in duplicates:
        print(
            f"  line {number}: duplicate ok record (run {record['run_id']}) of an experiment already recorded"
        )
    for text in disagreements:
        print(f"  index: {text}")
    for path in temps:
        print(f"  temporary file of a killed write: {path}")
    print(
        f"  {len(damaged)} damaged or foreign line(s), {len(duplicates)} duplicate(s), "
        f"{len(disagreements)} index disagreement(s), {len(stale)} stale claim(s), "
        f"{len(temps)} temporary file(s)"
    )
    if not (damaged or duplicates or disagreements or stale or temps):
        return status
    if not repair:
        print("repair with: python -m tnt_lightning.results doctor --repair")
        return 1
    with store.locked():
        if damaged:
            _move_aside(store, {line.number for line in damaged}, "damaged")
        if duplicates := store.duplicates():  # line numbers after the damaged lines left
            _move_aside(store, {number for number, _ in duplicates}, "duplicates")
        for path in stale:
            store._remove_if_stale(*path.stem.split("-", 1))
        for path in temps:
            path.unlink(missing_ok=True)
        print(f"  index rebuilt: {store.rebuild_index()} experiment(s)")
    return status


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
    check = sub.add_parser(
        "doctor", help="list claims, damaged and duplicated lines, index disagreements, temporary files"
    )
    check.add_argument("--results-dir", type=Path, default=_default_root() / "results")
    check.add_argument("--cache-dir", type=Path, default=_default_root() / "cache")
    check.add_argument(
        "--repair", action="store_true", help="move damaged and duplicated lines aside, rebuild the index"
    )
    check.add_argument(
        "--release",
        action="append",
        default=[],
        metavar="KEY",
        help="remove the claim of this config key (or claim file) although its job lives (a stopped job)",
    )
    sub.add_parser(
        "identity", help="print what decides an experiment, a backbone's weights, a trained method"
    )
    timing = sub.add_parser("bench", help="time the store's operations at several history sizes")
    timing.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    timing.add_argument("--ops", type=int, default=50)
    args = parser.parse_args(argv)
    with contextlib.suppress(BrokenPipeError):
        if args.command == "doctor":
            return doctor(args.results_dir, args.repair, args.release, args.cache_dir)
        if args.command == "identity":
            print(outcome_table())
            return 0
        return bench(args.sizes, args.ops)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
