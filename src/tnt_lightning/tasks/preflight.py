"""What a run's config asks for, built before the run starts: a config the method refuses (ToMe
multi-layer without ``method.r``, a block the backbone lacks, ...) fails here, before the run's
record, loggers and W&B folder exist, and so leaves neither a ``failed`` record nor a folder behind.

A failure once the run has started (weights, data, training, measuring) stays a recorded failure:
nothing computed is lost.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import Task


def preflight(cfg: DictConfig) -> None:
    """Build the backbone (no weights: on PyTorch's meta device, no memory) and apply the configured
    method to it, as the task will; raises the task's own error (a :class:`~tnt_lightning.config.UserError`
    naming the key) for a config that cannot run."""
    if Task(cfg.task) is Task.pretrain:  # trains the backbone alone: no method
        return
    import torch
    from hydra.utils import instantiate

    from ..methods.assembly import pruned_model
    from ..models import create_model

    with torch.device("meta"):
        model = create_model(instantiate(cfg.model))
    pruned_model(cfg, model)
