"""Tasks (``task=``): what a run does with the composed config."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import Task, validate
from ..results import config_key, find_recorded

log = logging.getLogger(__name__)


def recorded(cfg: DictConfig) -> dict[str, Any] | None:
    """This configuration's ok record in the results store, if it was run before."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return find_recorded(cfg.paths.results_dir, config_key(config), config["task"])


def run_task(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg`` and run its task; returns the run's record."""
    validate(cfg)
    task = Task(cfg.task)
    if cfg.get("skip_recorded"):
        done = recorded(cfg)
        if done is not None:
            log.info("skipping: recorded already as run %s (%s)", done["run_id"], done["created_at"])
            print(f"{task.value}: already recorded as run {done['run_id']}; skipped (skip_recorded=true)")
            return done
    if task is Task.eval:
        from .evaluate import evaluate

        return evaluate(cfg)
    if task is Task.pretrain:
        from .pretrain import pretrain

        return pretrain(cfg)
    if task in (Task.train, Task.train_eval):
        from .train import train

        record = train(cfg)
        if task is Task.train:
            return record
        from .evaluate import evaluate

        return evaluate(cfg)
    if task is Task.visualize:
        from .visualize import visualize

        return visualize(cfg)
    raise NotImplementedError(f"task={task.value} is not available yet")
