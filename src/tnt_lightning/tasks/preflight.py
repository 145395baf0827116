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

    from ..engine import apply_reducer, backbone_info
    from ..methods import build_reducer
    from ..models import create_model, drop_distillation_token

    spec = instantiate(cfg.model)
    with torch.device("meta"):
        model = create_model(spec)
    info = backbone_info(model)
    reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, info)
    if reducer is None:
        return
    reducer.bind(info)
    if reducer.cls_only_backbone:
        drop_distillation_token(model)
    apply_reducer(model, reducer)
