"""SiT's token slimming module (Zong et al., 2022), as in Haurum et al.'s TokenReduction benchmark.

Before block l+1 (after block l), an MLP ``LayerNorm -> Linear(D, D/2) -> GELU -> Linear(D/2, M)``
scores every patch for each of the M = ``int(n0 * rho_j)`` outputs; a learned scalar ``scale``
(starting at 1) multiplies the scores, a softmax over the *patches* gives W [M, n], and the outputs
are ``W @ x`` on the unnormalised patches. Hidden width ``int(D * hidden_ratio)`` (0.5).

Only the slimming module: SiT's feature-recalibration distillation, its dense knowledge
distillation and its own training schedule are not part of Haurum's benchmark and not offered.
Cost: LayerNorm 5 n D, the MLP n D h + n h M and the merge M n D multiply-adds (counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import BackboneInfo, ReductionError
from ..engine.registry import register_method
from .common.soft_merge import MergeStage, SoftMergeReducer, init_like_timm_vit


class SlimmingStage(MergeStage):
    def __init__(self, dim: int, outputs: int, hidden_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.weight = nn.Sequential(  # named as the reference's
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, outputs)
        )
        self.scale = nn.Parameter(torch.ones(1, 1, 1))
        init_like_timm_vit(self.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        weights = (self.weight(x) * self.scale).softmax(dim=1).transpose(1, 2)  # [B, M, n]
        return weights @ x, weights


@register_method(
    "sit",
    kind="learned",
    operation="merging",
    keep_rule="int(n0*rho^j) output tokens",
    paper="Zong et al., SiT, 2022, as in Haurum et al. 2023",
    reference="Haurum et al.'s TokenReduction code",
    order=16,
    colour="#c49c94",
)
class SiT(SoftMergeReducer):
    def __init__(
        self,
        info: BackboneInfo,
        blocks: Sequence[int],
        ratios: Sequence[float],
        hidden_ratio: float = 0.5,
        seed: int = 0,
    ) -> None:
        if int(info.embed_dim * hidden_ratio) < 1:
            raise ReductionError(f"method.hidden_ratio={hidden_ratio} leaves no hidden unit")
        self.hidden_ratio = float(hidden_ratio)
        super().__init__(info, blocks, ratios, seed=seed)

    def make_stage(self, dim: int, outputs: int) -> MergeStage:
        return SlimmingStage(dim, outputs, self.hidden_ratio)

    def options(self) -> dict[str, Any]:
        return {"hidden_ratio": self.hidden_ratio}
