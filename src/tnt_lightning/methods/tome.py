"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching, merging r tokens per block.

Inside block l, after the attention residual: tokens alternate into sets A (even positions) and
B (odd); each A token's best cosine match in B is found on the block's keys averaged over heads;
the r best-matched A tokens are merged into their B partners by a size-weighted mean. Later
blocks add log(size) to the attention logits (proportional attention), and a mean-pooled model
pools by size (docs/methods/tome.md). CLS (first of A) and DIST (first of B) are never merged, and the
token order after a merge is the official one, which the next block's parity split depends on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..engine import (
    AttentionInfo,
    AttentionNeeds,
    Location,
    ReductionError,
    Site,
    TokenReducer,
    Tokens,
    gather_rows,
)
from ..engine.registry import register_method
from .common.keep import tome_merge_count, tome_single_layer_r

# keys_mean: the official metric, the block's keys averaged over heads (D/H wide). keys: all heads
# concatenated (D wide), which the paper's own ViT/16 ToMe GFLOPs fit (docs/methods/tome.md#flops).
METRICS = ("keys_mean", "keys")


@register_method(
    "tome",
    kind="training-free",
    operation="merging",
    needs=("keys",),
    keep_rule="n - r per block (single-layer: r = n - int(n*K))",
    paper="Bolya et al., ToMe, ICLR 2023",
    reference="official ToMe (facebookresearch/ToMe)",
    order=6,
    colour="#e377c2",
)
class ToMe(TokenReducer):
    def __init__(
        self,
        blocks: Sequence[int],
        r: Sequence[int],
        prop_attn: bool = True,
        metric: str = "keys_mean",
        strict_half: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if len(blocks) != len(r):
            raise ReductionError(f"method=tome: {len(r)} values of r for {len(blocks)} blocks {list(blocks)}")
        if any(v < 0 for v in r):
            raise ReductionError(f"method=tome: r={list(r)} must be >= 0 tokens per block")
        if metric not in METRICS:
            raise ReductionError(f"method.metric={metric!r} is not one of {list(METRICS)}")
        self.r = {int(b): int(v) for b, v in zip(blocks, r, strict=True)}
        self.metric = metric
        self.prop_attn = prop_attn
        self.strict_half = strict_half

    @classmethod
    def from_schedule(cls, schedule: str, blocks: list[int], rates: list[float], info, r=None, **options):
        """Single-layer: merge ``n - int(n * K)`` tokens in one block (so K >= 0.5). Multi-layer:
        ``r`` tokens per block (an int for every block, or one value per block)."""
        if schedule == "single":
            return cls(blocks, [tome_single_layer_r(info.num_patches, rates[0])], strict_half=True, **options)
        if r is None:
            raise ReductionError(
                "method=tome with schedule=multi merges method.r tokens in every block: set e.g. method.r=8 "
                "(the paper's rows use r = 8, 11, 15, 20, 21, 22, 24, 25)"
            )
        r = [int(r)] * len(blocks) if isinstance(r, int) else [int(v) for v in r]
        return cls(blocks, r, **options)

    def resolved_schedule(self) -> dict[str, Any]:
        """Multi-layer ToMe runs on ``method.r``, not on keep rates: the record says r per block."""
        if self.strict_half:
            return {}
        return {"rates": None, "r": [self.r[b] for b in sorted(self.r)]}

    def bind(self, info) -> None:
        if info.num_prefix > 2:
            raise ReductionError(
                f"method=tome supports at most 2 prefix tokens (CLS, DIST), not {info.num_prefix}"
            )
        super().bind(info)
        n = info.num_patches
        for loc in self.locations():
            r = self.r[loc.block]
            if self.strict_half and r > n // 2:
                raise ReductionError(
                    f"method=tome merges at most half of a layer's tokens (bipartite matching): keeping "
                    f"{n - r} of {n} tokens {loc} needs r={r} > {n // 2}. Use keep_rate >= 0.5 for "
                    f"single-layer ToMe, or schedule=multi with method.r to spread the merging over blocks"
                )
            n -= tome_merge_count(r, n)

    def locations(self) -> list[Location]:
        return [Location(Site.INSIDE, b) for b, r in sorted(self.r.items()) if r > 0]

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each location (bound): ``n - min(r, n // 2)``, the kit's keep rule."""
        n, out = self.info.num_patches, {}
        for loc in self.locations():
            n = out[loc] = n - tome_merge_count(self.r[loc.block], n)
        return out

    def needs(self, block: int) -> AttentionNeeds:
        return AttentionNeeds(keys=self.r.get(block, 0) > 0)

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        r = tome_merge_count(self.r[loc.block], tokens.n)
        if r <= 0:
            return tokens
        keys = attn.keys.mean(dim=1) if self.metric == "keys_mean" else attn.keys.transpose(1, 2).flatten(2)
        unm_idx, src_idx, dst_idx = self.match(keys, r, tokens.num_prefix)
        size = tokens.size if tokens.size is not None else tokens.x.new_ones(*tokens.x.shape[:2], 1)

        def merge(t: Tensor, mode: str) -> Tensor:
            a, b = t[:, ::2], t[:, 1::2]
            index = dst_idx.expand(-1, -1, t.shape[-1])
            b = b.scatter_reduce(1, index, gather_rows(a, src_idx[..., 0]), reduce=mode)
            unm = gather_rows(a, unm_idx[..., 0])
            if tokens.num_prefix == 2:  # [CLS, DIST, other unmerged A, other B]
                return torch.cat([unm[:, :1], b[:, :1], unm[:, 1:], b[:, 1:]], dim=1)
            return torch.cat([unm, b], dim=1)

        new_size = merge(size, "sum")
        x = merge(tokens.x * size, "sum") / new_size
        source = merge(tokens.source.to(x.dtype), "amax").bool() if tokens.source is not None else None
        return Tokens(x, tokens.num_prefix, size=new_size, source=source)

    @staticmethod
    @torch.no_grad()
    def match(metric: Tensor, r: int, num_prefix: int) -> tuple[Tensor, Tensor, Tensor]:
        """Bipartite soft matching on ``metric`` [B, N, C]: indices of unmerged A, merged A, and their B."""
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        if num_prefix >= 1:
            scores[:, 0, :] = -math.inf
        if num_prefix == 2:
            scores[:, :, 0] = -math.inf
        best, best_b = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = order[:, r:], order[:, :r]
        dst_idx = best_b[..., None].gather(1, src_idx)
        if num_prefix >= 1:
            unm_idx = unm_idx.sort(dim=1).values  # CLS back to the front
        return unm_idx, src_idx, dst_idx
