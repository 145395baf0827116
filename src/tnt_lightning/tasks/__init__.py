"""Tasks (``task=``): what a run does with the composed config."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from ..config import Task, validate

log = logging.getLogger(__name__)


def run_task(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg`` and run its task; returns the run's record."""
    validate(cfg)
    task = Task(cfg.task)
    if task is Task.eval:
        from .evaluate import evaluate

        return evaluate(cfg)
    if task is Task.pretrain:
        from .pretrain import pretrain

        return pretrain(cfg)
    raise NotImplementedError(f"task={task.value} is not available yet")
