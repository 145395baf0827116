"""The top-level config schema and the range checks Hydra's types cannot express.

The schema is registered in Hydra's ConfigStore as ``config_schema`` and is the first entry of
``conf/config.yaml``'s defaults, so a wrong type or an unknown task or top-level key fails when
the config is composed. :func:`validate` then checks ranges, naming the key, the value and what is
allowed, before any data is read or any model is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class Task(Enum):
    eval = "eval"  # measure accuracy, GFLOPs and throughput of a (pruned) backbone
    pretrain = "pretrain"  # train a small backbone from scratch (vit_mnist) and cache it
    train = "train"  # train a learned method's parameters on a frozen backbone
    train_eval = "train_eval"  # train, then evaluate, in one run
    visualize = "visualize"  # token maps of a method


@dataclass
class RunConfig:
    task: Task = Task.eval
    keep_rate: float = 0.5
    seed: int = 0
    sweep_name: str | None = None
    tags: list[str] = field(default_factory=list)
    skip_recorded: bool = False
    paper_flops_compat: bool = False
    verbose: bool = False  # library banners and harmless warnings (tnt_lightning.quiet)
    model: Any = MISSING
    method: Any = MISSING
    schedule: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    measure: Any = MISSING
    paths: Any = MISSING
    train: Any = None
    visualize: Any = None


class ConfigError(ValueError):
    """A config value is out of its allowed range."""


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=RunConfig)
    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None:
        _check(isinstance(value, int) and value >= minimum, key, value, f"an integer >= {minimum}")


def validate(cfg: DictConfig) -> None:
    """Range checks on the composed config; raises :class:`ConfigError` naming the bad key."""
    _check(0.0 < cfg.keep_rate <= 1.0, "keep_rate", cfg.keep_rate, "0 < keep_rate <= 1")
    _check(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    for key in (
        "data.batch_size",
        "data.eval_batch_size",
        "measure.batch_size",
        "measure.iters",
        "measure.repeats",
    ):
        _positive_int(cfg, key)
    for key in ("data.num_workers", "measure.warmup"):
        _positive_int(cfg, key, minimum=0)
    mode = OmegaConf.select(cfg, "measure.throughput_mode")
    _check(mode in ("paper", "robust"), "measure.throughput_mode", mode, "one of ['paper', 'robust']")
    device = OmegaConf.select(cfg, "measure.device")
    _check(
        device == "auto" or str(device).split(":")[0] in ("cpu", "cuda"),
        "measure.device",
        device,
        "'auto', 'cpu' or 'cuda[:N]'",
    )
    schedule = OmegaConf.select(cfg, "schedule.name")
    _check(schedule in ("single", "multi"), "schedule.name", schedule, "one of ['single', 'multi']")
