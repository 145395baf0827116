"""Backbones (timm VisionTransformers) and their weights."""

from .artefact_io import CheckpointError, load_weight_file, reuse_cached, save_artefact
from .backbones import (
    BackboneSpec,
    PruningDefaults,
    WeightsUnavailableError,
    count_parameters,
    create_model,
    drop_distillation_token,
    set_fused_attn,
)
from .checkpoint import load_backbone_state, read_state_dict, state_dict_of
from .provider import check_checkpoint, ensure_pretrained, load_weights, pretrain_workdir, pretrained_path

__all__ = [
    "BackboneSpec",
    "CheckpointError",
    "PruningDefaults",
    "WeightsUnavailableError",
    "check_checkpoint",
    "count_parameters",
    "create_model",
    "drop_distillation_token",
    "ensure_pretrained",
    "load_backbone_state",
    "load_weight_file",
    "load_weights",
    "pretrain_workdir",
    "pretrained_path",
    "read_state_dict",
    "reuse_cached",
    "save_artefact",
    "set_fused_attn",
    "state_dict_of",
]
