"""eTPS (Wei et al., CVPR 2023): EViT-style pruning inside a block, then squeezing.

Inside block l, the top non-prefix tokens by CLS attention (heads averaged) are kept; each pruned
token is folded into its most similar kept ("host") token by TPS's squeeze instead of EViT's fused
token (docs/methods/etps.md). Keep count ``int(n * rate)`` (TNT-aligned) or EViT's ``ceil``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine import AttentionInfo, AttentionNeeds, ReductionError, Site, Tokens, complement, gather_rows
from ..engine.registry import register_method
from .common.keep import keep_ceil, keep_floor
from .common.squeeze import squeeze
from .common.staged import StagedReducer
from .topk import cls_attention

ROUNDINGS = {"floor": keep_floor, "ceil": keep_ceil}


@register_method(
    "etps",
    kind="training-free",
    operation="pruning+merging",
    needs=("cls_token", "cls_attention"),
    keep_rule="int(n*K) (method.rounding=ceil: EViT's)",
    paper="Wei et al., TPS, CVPR 2023",
    reference="official TPS squeeze and EViT",
    order=8,
    colour="#bcbd22",
)
class ETPS(StagedReducer):
    site = Site.INSIDE

    def __init__(
        self,
        blocks: Sequence[int],
        rates: Sequence[float],
        rounding: str = "floor",
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(blocks, rates, seed=seed)
        if rounding not in ROUNDINGS:
            raise ReductionError(f"method.rounding={rounding!r} is not one of {list(ROUNDINGS)}")
        self.keep_count = ROUNDINGS[rounding]
        self.temperature = temperature

    def needs(self, block: int) -> AttentionNeeds:
        return AttentionNeeds(cls_probs=self.rates.get(block, 1.0) < 1.0)

    def count_after(self, n: int, rate: float) -> int:
        return self.keep_count(n, rate)

    def prune(self, tokens: Tokens, rate: float, attn: AttentionInfo | None) -> Tokens:
        n, p = tokens.n, tokens.num_prefix
        k = self.keep_count(n, rate)
        if k == n:
            return tokens
        idx = cls_attention(attn, p).topk(k, dim=1, sorted=True).indices
        rest = complement(idx, n)
        kept = tokens.keep(idx)
        hosts, match = squeeze(kept.patches, gather_rows(tokens.patches, rest), self.temperature)
        source = None
        if tokens.source is not None:
            absorbed = match.transpose(1, 2) @ gather_rows(tokens.source[:, p:], rest).to(match.dtype)
            source = kept.source | torch.cat([torch.zeros_like(kept.source[:, :p]), absorbed > 0], dim=1)
        return Tokens(torch.cat([kept.prefix, hosts], dim=1), p, source=source)
