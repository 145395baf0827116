"""Reading weight files: DeiT release ``{"model": state_dict}``, timm ``.pth``/``.bin``, ``.safetensors``.

Official method checkpoints (TNT, DynamicViT) hold the backbone and the method's parameters in
one state dict with the official key names (``alpha_heads.{l}``, ``score_predictor.{j}``). The
backbone part is loaded into the timm model unchanged; the rest is returned for the method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artefact_io import EXPECTED, CheckpointError, load_weight_file

_WRAPPER_KEYS = ("model", "state_dict", "module")


def read_state_dict(
    path: str | Path,
    key: str = "model.checkpoint",
    trust_key: str = "model.trust_pickle",
    trust_pickle: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of the weight file that config key ``key`` names, unwrapped from the usual containers.

    Loaded weights-only; ``trust_pickle`` is the value of ``trust_key``, the opt-in for a trusted
    file that pickles other objects.
    """
    source = f"{key}={path}"
    return state_dict_of(load_weight_file(path, source, trust_key, trust_pickle), source)


def state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict in a loaded weight file, unwrapped, without a DDP ``module.`` prefix."""
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        found = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(f"{source} holds {found}, not a state dict; {EXPECTED}")
    others = sorted({type(v).__name__ for v in obj.values() if not isinstance(v, torch.Tensor)})
    if others:
        keys = [str(k) for k in list(obj)[:5]]
        raise CheckpointError(
            f"{source} holds a dict (keys {keys}...) whose values are {others}, not only tensors; {EXPECTED}"
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_backbone_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Load the backbone keys of ``state`` into ``model``; return the keys that are not the backbone's."""
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if k in own}
    extra = {k: v for k, v in state.items() if k not in own}
    missing = sorted(set(own) - set(backbone))
    if missing:
        raise CheckpointError(
            f"{source} does not fit this backbone: {len(missing)} of its tensors are missing "
            f"(first: {missing[:5]}). Is it a checkpoint of another architecture?"
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in backbone.items() if v.shape != own[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise CheckpointError(
            f"{source} does not fit this backbone: {key} has shape {got}, the model expects {want}"
            + (" (check model.num_classes)" if key.startswith("head") else "")
        )
    model.load_state_dict(backbone)
    return extra
