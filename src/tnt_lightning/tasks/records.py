"""One record per run: what was run, what it measured, and on what; written even when it fails."""

from __future__ import annotations

import logging
import platform
import subprocess
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from ..results import append_record, config_key

log = logging.getLogger(__name__)


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions, device and code revision a result was measured with."""
    import lightning
    import timm

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
    root = Path(__file__).resolve().parents[3]
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
    """Collects a run's metrics and appends its record on exit, ``ok`` or ``failed`` with the error.

    Whatever was measured before a failure stays in the failed record: nothing computed is lost.
    """

    def __init__(self, cfg: DictConfig, **fields: Any) -> None:
        self.cfg = cfg
        self.config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.run_id = uuid.uuid4().hex[:12]
        self.fields = fields
        self.metrics: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        self.record: dict[str, Any] | None = None
        self._start = time.time()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        status = "ok" if exc is None else "failed"
        error = None
        if exc is not None:
            error = {
                "type": exc_type.__name__,
                "message": str(exc),
                "traceback": "".join(traceback.format_tb(tb)),
            }
        self.record = self.build(status, error)
        if rank_zero_only.rank == 0:  # one record per job, not one per DDP process
            path = append_record(self.cfg.paths.results_dir, self.record)
            log.info("recorded run %s (%s) in %s", self.run_id, status, path)
        return False

    def build(self, status: str, error: dict | None) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "run_id": self.run_id,
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
            "config": self.config,
            "env": environment(self.details.get("throughput", {}).get("device")),
        }
