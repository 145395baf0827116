"""Progress of a SLURM sweep from another shell: ``make slurm-status``, or
``python -m tnt_lightning.results.watch``.

``make slurm`` waits until the sweep's last job ends; this reads what the sweep left on disk and
what SLURM says, without waiting:

* the sweep folder (the newest ``<log_dir>/multiruns/*`` with a ``.submitit`` folder, or
  ``--sweep-dir``): its submitit job folders give the SLURM job ids;
* ``sacct`` for those jobs: how many are pending, running, completed, failed, cancelled, requeued;
* the results store (:func:`tnt_lightning.results.read_records`): the records those jobs wrote
  (``record["slurm"]["job_id"]``), counted by status (ok, failed, preempted, ...).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import read_records

# sacct states of a job that has not ended yet.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "RESIZING", "SUSPENDED"}


def latest_sweep_dir(log_dir: Path) -> Path | None:
    """The newest multirun folder that was submitted through submitit."""
    candidates = [p.parent for p in (log_dir / "multiruns").glob("*/.submitit")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def sweep_job_ids(sweep_dir: Path) -> list[str]:
    """SLURM ids of the sweep's jobs (``<array>_<index>``, or ``<job>`` for a one-job sweep), from
    submitit's per-job folders."""
    names = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]
    ids = [n for n in names if re.fullmatch(r"\d+(_\d+)?", n)]
    return sorted(ids, key=lambda j: [int(x) for x in j.split("_")])


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """The state of each job (its allocation's line in ``sacct``); {} where sacct is unavailable."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(arrays)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states: dict[str, str] = {}
    for line in out.splitlines():
        job, _, state = line.partition("|")
        if job in job_ids:
            states[job] = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
    return states


def sweep_records(records: list[dict[str, Any]], job_ids: list[str]) -> list[dict[str, Any]]:
    """The records written by these jobs (any attempt)."""
    wanted = set(job_ids)
    return [r for r in records if (r.get("slurm") or {}).get("job_id") in wanted]


def summary(sweep_dir: Path, results_dir: Path) -> dict[str, Any]:
    job_ids = sweep_job_ids(sweep_dir)
    states = sacct_states(job_ids)
    records = sweep_records(read_records(results_dir, history=True), job_ids)  # every attempt
    return {
        "sweep_dir": str(sweep_dir),
        "jobs": len(job_ids),
        "slurm": dict(collections.Counter(states.values())),
        "active": sum(state in ACTIVE_STATES for state in states.values()),
        "records": dict(collections.Counter(r.get("status") for r in records)),
    }


def format_summary(s: dict[str, Any]) -> str:
    slurm = ", ".join(f"{k.lower()} {v}" for k, v in sorted(s["slurm"].items())) or "sacct: no answer"
    records = ", ".join(f"{k} {v}" for k, v in sorted(s["records"].items())) or "none yet"
    return f"{s['sweep_dir']}: {s['jobs']} job(s); SLURM: {slurm}; records: {records}"


def main(argv: list[str] | None = None) -> int:
    root = Path(os.environ.get("TNT_ROOT", os.getcwd()))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep-dir", type=Path, help="the sweep's folder (default: the newest submitted)")
    parser.add_argument("--log-dir", type=Path, default=root / "outputs", help="paths.log_dir")
    parser.add_argument("--results-dir", type=Path, default=root / "results", help="paths.results_dir")
    parser.add_argument("--follow", type=float, metavar="SECONDS", help="repeat until no job is active")
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir or latest_sweep_dir(args.log_dir)
    if sweep_dir is None or not (sweep_dir / ".submitit").is_dir():
        print(f"no submitted sweep under {args.log_dir / 'multiruns'} (--sweep-dir DIR)", file=sys.stderr)
        return 2
    while True:
        s = summary(sweep_dir, args.results_dir)
        print(time.strftime("%H:%M:%S"), format_summary(s), flush=True)
        if not args.follow or s["active"] == 0:
            return 0
        time.sleep(args.follow)


if __name__ == "__main__":
    sys.exit(main())
