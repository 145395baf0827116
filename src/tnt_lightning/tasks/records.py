"""One record per run: what was run, what it measured, and on what; written even when it fails or
is stopped (:mod:`.interrupts` says with which status). Imports nothing heavy: run_task uses it
before validation has passed."""

from __future__ import annotations

import contextvars
import logging
import platform
import subprocess
import time
import traceback
import uuid
from datetime import datetime, timezone
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..results import CONFIG_KEY_VERSION, ResultsStore, config_key, slurm
from .interrupts import outcome, signals_deferred

log = logging.getLogger(__name__)

# The claim id of the job running now (:func:`tnt_lightning.tasks.run_task`): every record the job
# writes carries it, so a job killed between its two store writes can be recovered from its claim.
current_attempt: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_attempt", default=None)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def process_rank() -> int:
    """This process's rank in a distributed job (0 when not distributed), as Lightning reads it."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions, device and code revision a result was measured with."""
    import lightning
    import timm
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "device": device or ("cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"),
        "threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """The clone's commit (``-dirty`` with uncommitted changes); None for an installed wheel."""
    from ..config import source_root

    root = source_root()
    if root is None:
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


class RunRecorder:
    """Collects a run's metrics and appends its record on exit: ``ok``, or ``failed`` (with the
    error), ``interrupted``, ``preempted`` or ``timed_out`` (:func:`.interrupts.outcome`).

    Whatever was measured before a failure stays in the record: nothing computed is lost.
    """

    def __init__(self, cfg: DictConfig, **fields: Any) -> None:
        self.cfg = cfg
        self.config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.run_id = new_run_id()
        self.fields = fields
        self.metrics: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.record: dict[str, Any] | None = None
        self._start = time.time()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # Stop signals wait until the record is written: a second SIGTERM while it is built (imports,
        # git) would otherwise end the job without one.
        with signals_deferred():
            status, _ = outcome(exc, tb)
            error = None
            if exc is not None:
                error = {
                    "type": exc_type.__name__,
                    "message": str(exc) or repr(exc),
                    "traceback": "".join(traceback.format_tb(tb)),
                }
            self.record = self.build(status, error)
            if process_rank() == 0:  # one record per job, not one per DDP process
                path = ResultsStore(self.cfg.paths.results_dir).append(self.record)
                log.info("recorded run %s (%s) in %s", self.run_id, status, path)
        return False

    def build(self, status: str, error: dict | None) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "run_id": self.run_id,
            "attempt_id": current_attempt.get(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "status": status,
            "error": error,
            "task": self.fields.get("task", self.config["task"]),
            "model": cfg.model.name,
            "method": cfg.method.name,
            "keep_rate": self.fields.get("keep_rate", cfg.keep_rate),
            "schedule": self.fields.get("schedule", {"name": cfg.schedule.name}),
            "data": cfg.data.name,
            "seed": cfg.seed,
            "sweep_name": cfg.sweep_name,
            "metrics": self.metrics,
            "details": self.details,
            "duration_s": round(time.time() - self._start, 2),
            "config_key": config_key(self.config),
            "config_key_version": CONFIG_KEY_VERSION,
            "slurm": slurm.job_info(),
            "config": self.config,
            "env": environment(self.details.get("throughput", {}).get("device")),
        }
