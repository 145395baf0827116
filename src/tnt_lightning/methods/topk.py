"""Top-K (Haurum et al. 2023, placed as in TNT): keep the patches the CLS token attends to most.

Inside block l, between the attention residual and the MLP, so block l's MLP already runs on the
kept tokens. Score: block l's CLS query row averaged over heads, at patch columns only (a DIST
token is a prefix token: kept, never scored). ``int(n * rate)`` of the current n (docs/methods/topk.md).
Equals official EViT with ``fuse_token=False`` on a CLS-only model, up to EViT's ceil rounding.
"""

from __future__ import annotations

from torch import Tensor

from ..engine import AttentionInfo, AttentionNeeds, Site, Tokens
from ..engine.registry import register_method
from .common.keep import keep_floor
from .common.staged import StagedReducer


def cls_attention(attn: AttentionInfo, num_prefix: int) -> Tensor:
    """[B, n]: attention of the CLS query to each non-prefix token, averaged over heads."""
    return attn.cls_probs[:, :, 0, num_prefix:].mean(dim=1)


@register_method(
    "topk",
    kind="training-free",
    operation="pruning",
    needs=("cls_token", "cls_attention"),
    keep_rule="int(n*K) of the current n",
    paper="Haurum et al. 2023, placed as in TNT",
    reference="official EViT with fuse_token=False (youweiliang/evit)",
    order=2,
    colour="#2ca02c",
)
class TopK(StagedReducer):
    site = Site.INSIDE

    def needs(self, block: int) -> AttentionNeeds:
        return AttentionNeeds(cls_probs=self.rates.get(block, 1.0) < 1.0)

    def count_after(self, n: int, rate: float) -> int:
        return keep_floor(n, rate)

    def prune(self, tokens: Tokens, rate: float, attn: AttentionInfo | None) -> Tokens:
        score = cls_attention(attn, tokens.num_prefix)
        return tokens.keep(score.topk(keep_floor(tokens.n, rate), dim=1, sorted=True).indices)
