"""AdamW with timm's weight-decay grouping, and the two learning-rate schedules of the recipes.

* ``step``: linear warm-up from ``warmup_lr`` then cosine to ``min_lr``, updated every step
  (DynamicViT's ``cosine_scheduler``).
* ``epoch``: timm 0.3.2's cosine stepped once per epoch as DeiT's training loop does (TNT, TPS):
  warm-up not subtracted from the cosine phase, and the scheduler is stepped *after* each epoch,
  so epoch e trains at lr(e - 1) and epochs 0 and 1 both use ``warmup_lr`` (docs/methods/tnt.md#training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("step", "epoch")


@dataclass
class OptimConfig:
    """Optimiser and schedule. ``lr`` is the learning rate actually used (already batch-scaled)."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    schedule: str = "step"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.weight_decay and optim.warmup_epochs must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        self.betas = tuple(self.betas)


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float, lr: float) -> list[dict]:
    """timm's rule: no weight decay on biases and other 1-D parameters (norms, tokens)."""
    decay = [p for n, p in params if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in params if not (p.ndim > 1 and not n.endswith(".bias"))]
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


def step_lr(cfg: OptimConfig, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_lr(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """The lr epoch ``epoch`` trains at under DeiT's loop with timm 0.3.2's CosineLRScheduler."""
    t = max(0, epoch - 1)
    if t < cfg.warmup_epochs:
        return cfg.warmup_lr + t * (cfg.lr - cfg.warmup_lr) / cfg.warmup_epochs
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / epochs))


def build_optimizer(
    named_params: list[tuple[str, nn.Parameter]],
    cfg: OptimConfig,
    steps_per_epoch: int,
    epochs: int,
    scaled: tuple[list[tuple[str, nn.Parameter]], float] = ([], 1.0),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and a LambdaLR stepped every optimisation step (both schedules are expressed per step).

    ``scaled``: more parameters and the factor their lr is of ``cfg.lr`` at every step (a
    fine-tuned backbone at 0.01x, as DynamicViT's recipe).
    """
    if not named_params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    extra, scale = scaled
    groups = param_groups(named_params, cfg.weight_decay, cfg.lr)
    if extra:
        groups += param_groups(extra, cfg.weight_decay, cfg.lr * scale)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    steps_per_epoch = max(1, steps_per_epoch)
    total = steps_per_epoch * max(1, epochs)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if cfg.schedule == "epoch":
            return epoch_lr(cfg, step // steps_per_epoch, epochs) / cfg.lr
        return step_lr(cfg, step, total, warmup) / cfg.lr

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
