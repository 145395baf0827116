"""Reading weight files: DeiT release ``{"model": state_dict}``, timm ``.pth``/``.bin``, ``.safetensors``.

Official method checkpoints (TNT, DynamicViT) hold the backbone and the method's parameters in
one state dict with the official key names (``alpha_heads.{l}``, ``score_predictor.{j}``). The
backbone part is loaded into the timm model unchanged; the rest is returned for the method.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("model", "state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from the usual containers."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Training checkpoints of the official repos also pickle their argparse Namespace.
        log.warning("%s holds non-tensor objects; loading it with full unpickling (trust the file)", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{str(path)!r} is not a state dict (nor one wrapped under {list(_WRAPPER_KEYS)})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_backbone_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Load the backbone keys of ``state`` into ``model``; return the keys that are not the backbone's."""
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if k in own}
    extra = {k: v for k, v in state.items() if k not in own}
    missing = sorted(set(own) - set(backbone))
    if missing:
        raise ValueError(
            f"{source} does not fit this backbone: {len(missing)} of its tensors are missing "
            f"(first: {missing[:5]}). Is it a checkpoint of another architecture?"
        )
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in backbone.items() if v.shape != own[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise ValueError(
            f"{source} does not fit this backbone: {key} has shape {got}, the model expects {want}"
            + (" (check model.num_classes)" if key.startswith("head") else "")
        )
    model.load_state_dict(backbone)
    return extra
