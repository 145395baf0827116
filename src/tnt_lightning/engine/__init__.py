"""The token-reduction engine: hook points in an unmodified timm ViT, token state, keep counts."""

from .attention import attend, softmax_with_policy
from .patch import TokenReductionMixin, apply_reducer, backbone_info, remove_reducer
from .reducer import (
    AttentionInfo,
    AttentionNeeds,
    BackboneInfo,
    Location,
    ReductionError,
    Site,
    TokenReducer,
)
from .registry import MethodInfo, register_method
from .tokens import Tokens, complement, gather_rows

__all__ = [
    "AttentionInfo",
    "AttentionNeeds",
    "BackboneInfo",
    "Location",
    "MethodInfo",
    "ReductionError",
    "Site",
    "TokenReducer",
    "TokenReductionMixin",
    "Tokens",
    "apply_reducer",
    "attend",
    "backbone_info",
    "complement",
    "gather_rows",
    "register_method",
    "remove_reducer",
    "softmax_with_policy",
]
