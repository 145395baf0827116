"""EViT (Liang et al., ICLR 2022): keep the attentive tokens, fuse the rest into one token.

Inside block l: the top ``ceil(rate * n)`` non-prefix tokens by CLS attention (heads averaged)
are kept, sorted by score; the others are summed, weighted by their raw (not renormalised) CLS
attention, into a fused token appended last. At a later location the previous fused token is an
ordinary candidate. ``fuse_token: false`` only drops (docs/methods/evit.md).

DIST: the official code ranks the DIST token like a patch; here it is a prefix token (kept, never
scored). ``paper_flops_compat`` runs a CLS-only backbone instead, which is what the paper's
GFLOPs imply (docs/methods/evit.md#dist-token, docs/methods/conventions.md#dist-token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine import AttentionInfo, AttentionNeeds, Site, Tokens, complement, gather_rows
from ..engine.registry import register_method
from .common.keep import keep_ceil
from .common.staged import StagedReducer
from .topk import cls_attention


@register_method(
    "evit",
    kind="training-free",
    operation="pruning+merging",
    needs=("cls_token", "cls_attention"),
    keep_rule="ceil(K*n) kept, the rest fused into one token",
    paper="Liang et al., EViT, ICLR 2022",
    reference="official EViT (youweiliang/evit)",
    order=7,
    colour="#7f7f7f",
)
class EViT(StagedReducer):
    site = Site.INSIDE

    def __init__(
        self,
        blocks: Sequence[int],
        rates: Sequence[float],
        fuse_token: bool = True,
        paper_flops_compat: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(blocks, rates, seed=seed)
        self.fuse_token = fuse_token
        self.cls_only_backbone = paper_flops_compat

    def needs(self, block: int) -> AttentionNeeds:
        return AttentionNeeds(cls_probs=self.rates.get(block, 1.0) < 1.0)

    def count_after(self, n: int, rate: float) -> int:
        k = keep_ceil(n, rate)
        return n if k == n else k + int(self.fuse_token)

    def prune(self, tokens: Tokens, rate: float, attn: AttentionInfo | None) -> Tokens:
        n, p = tokens.n, tokens.num_prefix
        k = keep_ceil(n, rate)
        if k == n:
            return tokens
        score = cls_attention(attn, p)
        idx = score.topk(k, dim=1, sorted=True).indices
        kept = tokens.keep(idx)
        if not self.fuse_token:
            return kept
        rest = complement(idx, n)
        weight = gather_rows(score, rest)[..., None]  # [B, n - k, 1]
        fused = (gather_rows(tokens.patches, rest) * weight).sum(dim=1, keepdim=True)
        source = None
        if tokens.source is not None:
            fused_source = gather_rows(tokens.source[:, p:], rest).any(dim=1, keepdim=True)
            source = torch.cat([kept.source, fused_source], dim=1)
        return Tokens(torch.cat([kept.x, fused], dim=1), p, source=source)
