"""Backbones (timm VisionTransformers) and their weights."""

from .backbones import (
    BackboneSpec,
    PruningDefaults,
    WeightsUnavailableError,
    count_parameters,
    create_model,
    drop_distillation_token,
    set_fused_attn,
)
from .checkpoint import load_backbone_state, read_state_dict
from .provider import ensure_pretrained, load_weights, pretrain_workdir, pretrained_path

__all__ = [
    "BackboneSpec",
    "PruningDefaults",
    "WeightsUnavailableError",
    "count_parameters",
    "create_model",
    "drop_distillation_token",
    "ensure_pretrained",
    "load_backbone_state",
    "load_weights",
    "pretrain_workdir",
    "pretrained_path",
    "read_state_dict",
    "set_fused_attn",
]
