"""What a run's config asks for, built before the run starts: a config the method refuses (ToMe
multi-layer without ``method.r``, a block the backbone lacks, ...) fails here, before the run's
record, loggers and W&B folder exist, and so leaves neither a ``failed`` record nor a folder behind.

A failure once the run has started (weights, data, training, measuring) stays a recorded failure:
nothing computed is lost.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import Task
from ..errors import ConfigError


def check_training_batch(cfg: DictConfig) -> None:
    """Refuse a learned method's recipe (with ``data.train_overrides`` applied) whose batch size is
    odd while mixup or cutmix is on: timm's Mixup pairs each image with its mirror in the batch,
    so every batch of it would fail at the first step (``lit/reduction.py`` checks it there too,
    for modules built in Python)."""
    if "train" not in cfg.method:
        return
    from ..models.trained import recipe

    rec = recipe(cfg)
    size, mixup, cutmix = int(rec.batch_size), float(rec.get("mixup") or 0), float(rec.get("cutmix") or 0)
    if size % 2 and (mixup > 0 or cutmix > 0):
        raise ConfigError(
            f"method={cfg.method.name}'s training batch size {size} (method.train.batch_size, or "
            f"data.train_overrides) is odd, and mixup={mixup} / cutmix={cutmix} need an even batch: set "
            f"method.train.batch_size={size + 1} (or any even size), or method.train.mixup=0 "
            f"method.train.cutmix=0"
        )


def preflight(cfg: DictConfig) -> None:
    """Build the backbone (no weights: on PyTorch's meta device, no memory) and apply the configured
    method to it, as the task will, and check a learned method's training batch; raises the task's
    own error (a :class:`~tnt_lightning.config.UserError` naming the key) for a config that cannot
    run."""
    if Task(cfg.task) is Task.pretrain:  # trains the backbone alone: no method
        return
    check_training_batch(cfg)
    import torch
    from hydra.utils import instantiate

    from ..methods.assembly import pruned_model
    from ..models import create_model

    with torch.device("meta"):
        model = create_model(instantiate(cfg.model))
    pruned_model(cfg, model)
