"""Random drop (baseline): keep ``int(n * K)`` patch tokens chosen uniformly at random.

Acts after block l (the paper: where TNT acts, docs/methods/random.md). Drawn per sample from the method's
own seeded generator; the kept tokens stay in their original order.
"""

from __future__ import annotations

import torch

from ..engine import AttentionInfo, Site, Tokens
from ..engine.registry import register_method
from .common.keep import keep_floor
from .common.staged import StagedReducer


@register_method(
    "random",
    kind="training-free",
    operation="pruning",
    keep_rule="int(n*K) patches, drawn at random",
    paper="baseline",
    reference="none (a baseline)",
    order=1,
    colour="#ff7f0e",
)
class RandomDrop(StagedReducer):
    site = Site.AFTER
    conformance_exceptions = {
        "batch-independent": "draws one row of random scores per image of the batch (torch.rand(B, n)), so "
        "which patches an image keeps depends on its place in the batch; the draws are seeded and repeat"
    }

    def count_after(self, n: int, rate: float) -> int:
        return keep_floor(n, rate)

    def prune(self, tokens: Tokens, rate: float, attn: AttentionInfo | None) -> Tokens:
        batch, n = tokens.x.shape[0], tokens.n
        draws = torch.rand(batch, n, device=tokens.x.device, generator=self.generator(tokens.x.device))
        idx = draws.topk(keep_floor(n, rate), dim=1).indices.sort(dim=1).values
        return tokens.keep(idx)
