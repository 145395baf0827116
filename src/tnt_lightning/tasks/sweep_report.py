"""What a ``-m`` sweep runs and what came of it, for the person who started it.

A Hydra callback (``conf/hydra/default.yaml``, ``hydra.callbacks.sweep_report``) prints
``job i of N: <the job's own overrides>`` before each job and, at the end, one table of every job:
recorded (its run id), skipped (already recorded, or running elsewhere) or failed (the error in one
line). A failed job does not stop the sweep: its error is printed when it fails (the traceback for
anything but a :class:`~tnt_lightning.config.UserError`, or with ``HYDRA_FULL_ERROR=1``), the other
jobs run, and the sweep exits with status 1 after the table.

Each job's outcome is also written to its Hydra folder (``sweep_outcome.json``): jobs that a
launcher runs in other processes (``hydra/launcher=slurm``, ``local``) are read back from there.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

OUTCOME_FILE = "sweep_outcome.json"


@dataclass
class Outcome:
    """One job's end: ``recorded``, ``skipped`` or ``failed``, and what to say about it."""

    job: int  # Hydra's hydra.job.num (0-based)
    overrides: str  # the job's own overrides (those the sweep varies)
    status: str
    detail: str
    recorded_by: str | None = None  # a skipped job's record: the commit that made it


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job's overrides as Hydra's basic sweeper will run them; None for another sweeper."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        sweeper = config.hydra.sweeper
        if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return None
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        loader = GlobalHydra.instance().config_loader() if GlobalHydra.instance().is_initialized() else None
        parser = OverridesParser.create(config_loader=loader)
        overrides = parser.parse_overrides([*params, *config.hydra.overrides.task])
        return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception:  # the report never stops a sweep: without the list, jobs print "job i"
        return None


def in_sweep(config: DictConfig) -> bool:
    """Whether this job is one of a ``-m`` sweep (Hydra calls the job hooks for single runs too)."""
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def one_line(error: BaseException) -> str:
    message = (str(error) or repr(error)).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"


def describe_record(record: dict[str, Any], started: float) -> tuple[str, str]:
    """``(status, detail)`` of a job that returned ``record``: made by this job, or found done."""
    try:
        made_at = datetime.fromisoformat(record["created_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        made_at = math.inf
    if made_at < math.floor(started):  # the store's record from before this job (run_task)
        return "skipped", f"already recorded as run {record.get('run_id')} ({record.get('created_at')})"
    metrics = record.get("metrics") or {}
    shown = [f"acc1 {metrics['acc1']:.2f}%" if metrics.get("acc1") is not None else ""]
    shown.append(f"{metrics['gflops']:.4g} GFLOPs" if metrics.get("gflops") is not None else "")
    shown = [s for s in shown if s]
    return "recorded", f"run {record.get('run_id')}" + (f" ({', '.join(shown)})" if shown else "")


class SweepReport(Callback):
    """Prints each job before it runs and the sweep's table at its end (module docstring)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.common: list[str] = []
        self.started: dict[int, float] = {}
        self.outcomes: dict[int, Outcome] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = sweep_jobs(config)
        if jobs is None:
            return
        self.total = len(jobs)
        self.common = [o for o in jobs[0] if all(o in job for job in jobs)] if len(jobs) > 1 else []
        print(f"sweep of {self.total} job(s)", flush=True)  # the overrides all share: the command line

    def _own(self, overrides: list[str]) -> str:
        return " ".join(o for o in overrides if o not in self.common) or " ".join(overrides) or "(defaults)"

    def _name(self, job: int) -> str:
        return f"job {job + 1}" + (f" of {self.total}" if self.total else "")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not in_sweep(config):
            return
        job = int(config.hydra.job.num)
        self.started[job] = time.time()
        print(f"{self._name(job)}: {self._own(list(config.hydra.overrides.task))}", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not in_sweep(config):  # a single run: run.py reports it
            return
        job = int(config.hydra.job.num)
        own = self._own(list(config.hydra.overrides.task))
        value = job_return._return_value
        if job_return.status is JobStatus.FAILED:
            self._print_failure(job, value)
            outcome = Outcome(job, own, "failed", one_line(value))
            # The sweep goes on and ends with the table (a FAILED return would end it at once,
            # without on_multirun_end); on_multirun_end exits with status 1 instead.
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = outcome
        elif value is None:
            outcome = Outcome(job, own, "skipped", "running elsewhere (run_task's claim)")
        elif isinstance(value, dict):
            outcome = Outcome(job, own, *describe_record(value, self.started.get(job, time.time())))
            outcome.recorded_by = (value.get("env") or {}).get("git_commit")
        else:
            outcome = Outcome(job, own, "done", "")
        self.outcomes[job] = outcome
        try:
            path = Path(str(config.hydra.runtime.output_dir)) / OUTCOME_FILE
            path.write_text(json.dumps(asdict(outcome)))
        except OSError:
            pass  # the table still has it when the job ran in this process

    def _print_failure(self, job: int, error: BaseException) -> None:
        from ..errors import UserError

        print(f"{self._name(job)} failed:", file=sys.stderr)
        if isinstance(error, UserError) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"error: {error}", file=sys.stderr)
        else:
            traceback.print_exception(error, file=sys.stderr)
        sys.stderr.flush()

    def _read_back(self, config: DictConfig) -> dict[int, Outcome]:
        """Outcomes of jobs run in other processes, from their folders."""
        found: dict[int, Outcome] = {}
        try:
            for path in Path(str(config.hydra.sweep.dir)).glob(f"*/{OUTCOME_FILE}"):
                outcome = Outcome(**json.loads(path.read_text()))
                found[outcome.job] = outcome
        except (OSError, ValueError, TypeError):
            pass
        return found

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        outcomes = {**self._read_back(config), **self.outcomes}
        if not outcomes:  # nothing ran here (hydra/launcher=slurm_dry)
            return
        print(format_table([outcomes[k] for k in sorted(outcomes)], self.total), flush=True)
        older = other_commit_line(list(outcomes.values()))
        if older:
            print(older, flush=True)
        if any(o.status == "failed" for o in outcomes.values()):
            raise SystemExit(1)  # a callback's exception would only be a warning


def other_commit_line(outcomes: list[Outcome], current: str | None = None) -> str | None:
    """One line when skipped jobs were recorded by another commit than this code's, with how to
    run them again; None when every skipped record is this commit's (or no commit is known)."""
    if current is None:
        from .records import git_commit

        current = git_commit()
    if current is None:
        return None
    older = sorted(
        {o.recorded_by for o in outcomes if o.status == "skipped" and o.recorded_by not in (None, current)}
    )
    if not older:
        return None
    count = sum(o.status == "skipped" and o.recorded_by in older for o in outcomes)
    commits = ", ".join(c[:12] for c in older)
    return (
        f"{count} skipped job(s) were recorded by another commit ({commits}; this code is {current[:12]}): "
        f"add skip_recorded=false to the same command to measure them again with this code"
    )


def format_table(outcomes: list[Outcome], total: int | None = None) -> str:
    """The sweep's end: one line per job, and the counts."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("recorded", "skipped", "failed")}
    head = ", ".join(f"{n} {s}" for s, n in counts.items())
    rows = [("job", "overrides", "outcome")]
    rows += [
        (str(o.job + 1), o.overrides, f"{o.status}: {o.detail}" if o.detail else o.status) for o in outcomes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"sweep done, {len(outcomes)} of {total or len(outcomes)} job(s): {head}"]
    lines += [f"  {a:>{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)
