"""PatchMerger (Renggli et al., 2022), as in Haurum et al.'s TokenReduction benchmark.

Before block l+1 (after block l), M = ``int(n0 * rho_j)`` learned queries Q [M, D] attend over
the LayerNorm-ed patch tokens: ``W = softmax_over_patches(Q @ LN(x)^T * scale)`` and the M output
tokens are ``W @ LN(x)``. Scale 1 (Haurum's default, ``scaled_attention=False``; ``scaled: true``
gives ``D ** -0.5``). Queries start as a standard normal draw, the LayerNorm at identity.

Cost: LayerNorm 5 n D, the similarities M n D and the merge M n D multiply-adds (counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import BackboneInfo
from ..engine.registry import register_method
from .common.soft_merge import MergeStage, SoftMergeReducer


class PatchMergerStage(MergeStage):
    def __init__(self, dim: int, outputs: int, scaled: bool) -> None:
        super().__init__()
        self.scale = dim**-0.5 if scaled else 1.0
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(outputs, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm(x)
        weights = (self.queries @ x.transpose(1, 2) * self.scale).softmax(dim=-1)  # [B, M, n]
        return weights @ x, weights


@register_method(
    "patchmerger",
    kind="learned",
    operation="merging",
    keep_rule="int(n0*rho^j) output tokens",
    paper="Renggli et al., PatchMerger, 2022, as in Haurum et al. 2023",
    reference="Haurum et al.'s TokenReduction code",
    order=14,
    colour="#ff9896",
)
class PatchMerger(SoftMergeReducer):
    def __init__(
        self,
        info: BackboneInfo,
        blocks: Sequence[int],
        ratios: Sequence[float],
        scaled: bool = False,
        seed: int = 0,
    ) -> None:
        self.scaled = scaled
        super().__init__(info, blocks, ratios, seed=seed)

    def make_stage(self, dim: int, outputs: int) -> MergeStage:
        return PatchMergerStage(dim, outputs, self.scaled)

    def options(self) -> dict[str, Any]:
        return {"scaled": self.scaled}
