"""Zero-TP / Zero-TPrune (Wang et al., CVPR 2024): attention-graph importance, then similarity.

No official code exists; this follows the paper, the TNT paper's use of it and the FLOP anchors
(docs/methods/zerotp.md). After block l, using block l's attention and keys:

* I-stage: weighted PageRank on each head's attention graph, ``w <- A^T w`` from a uniform start
  for ``itr`` iterations (importance flows to the attended tokens); heads combined by their
  root-mean-square (our choice; ``head_aggregation: mean`` is the option). Prefix tokens take part
  in the graph; only patches are ranked. Keeps the top ``int(n * rate) + s``.
* S-stage: sequential partition by importance (B = the more important half) on the keys, heads
  concatenated; drops the ``s`` members of A most similar to B (``s`` is clamped, with a warning,
  to half the candidates: late multi-layer locations can have fewer than 2s tokens).

Single-layer: itr 50, s = 25 (DeiT) / 30 (ViT/16). Multi-layer: after blocks 0,2,5,8,10 with
itr [30,5,5,1,1]; the first and last locations are similarity-only (rate 1, s = ``s_multi``), the
others importance-only. The paper's multi-layer GFLOPs cannot be reproduced
(docs/methods/zerotp.md#multi-layer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

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
from .common.keep import keep_floor
from .common.similarity import sequential_partition_prune

HEAD_AGGREGATIONS = ("rms", "mean")

log = logging.getLogger(__name__)


# On a CPU, PageRank's vector-matrix products are bound by memory traffic: a batch of 32 DeiT-S
# attention maps is 30 MB, read once per iteration. Iterating a few images at a time keeps their
# maps in cache across the iterations (3x faster at batch 32, bitwise the same result; at least
# 2 images per chunk, as a single image's product takes a kernel that rounds differently); a GPU
# takes the whole batch at once.
CPU_CHUNK_BYTES = 4 * 2**20
HALF_TYPES = (torch.float16, torch.bfloat16)


def weighted_pagerank(probs: Tensor, iterations: int) -> Tensor:
    """[B, H, N] per-head importance after ``iterations`` of ``w <- A^T w`` from a uniform start.

    Half-precision maps (``measure.dtype`` bf16 / fp16) are iterated in float32 with autocast off,
    so that the ranking does not carry the rounding of 30 to 50 half-precision products, and
    because a bf16 vector-matrix product is 2x slower than fp32 on a CPU (Intel Xeon, AMX: 28.6 vs
    14.1 ms for 30 iterations at batch 32; docs/design-notes.md#zerotp-pagerank). float32 and float64
    maps are unchanged.
    """
    batch, heads, n, _ = probs.shape
    dtype = torch.float32 if probs.dtype in HALF_TYPES else probs.dtype
    per_image = heads * n * n * dtype.itemsize
    chunk = max(2, CPU_CHUNK_BYTES // per_image) if probs.device.type == "cpu" else batch
    importance = []
    with torch.autocast(probs.device.type, enabled=False):
        for maps in probs.split(chunk):
            maps = maps.to(dtype)
            w = maps.new_full((maps.shape[0], heads, 1, n), 1.0 / n)
            for _ in range(iterations):
                w = w @ maps
            importance.append(w[:, :, 0])
    return torch.cat(importance)


@register_method(
    "zerotp",
    kind="training-free",
    operation="pruning",
    needs=("attention_probs", "keys"),
    keep_rule="int(n*K) + s by importance, then s dropped by similarity",
    paper="Wang et al., Zero-TPrune, CVPR 2024",
    reference="none, reimplemented from the paper",
    order=3,
    colour="#d62728",
)
class ZeroTP(TokenReducer):
    def __init__(
        self,
        blocks: Sequence[int],
        rates: Sequence[float],
        iterations: Sequence[int],
        similarity_tokens: Sequence[int],
        head_aggregation: str = "rms",
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        lengths = {len(blocks), len(rates), len(iterations), len(similarity_tokens)}
        if len(lengths) != 1:
            raise ReductionError(
                f"method=zerotp needs one rate, iteration count and similarity count per location: got "
                f"blocks={list(blocks)}, rates={list(rates)}, iterations={list(iterations)}, "
                f"similarity_tokens={list(similarity_tokens)}"
            )
        if head_aggregation not in HEAD_AGGREGATIONS:
            raise ReductionError(
                f"method.head_aggregation={head_aggregation!r} is not one of {list(HEAD_AGGREGATIONS)}"
            )
        if (
            any(not 0.0 < r <= 1.0 for r in rates)
            or any(i < 1 for i in iterations)
            or any(s < 0 for s in similarity_tokens)
        ):
            raise ReductionError(
                f"method=zerotp: rates {list(rates)} must be in (0, 1], iterations {list(iterations)} >= 1, "
                f"similarity_tokens {list(similarity_tokens)} >= 0"
            )
        self.stages = {
            int(b): (float(r), int(i), int(s))
            for b, r, i, s in zip(blocks, rates, iterations, similarity_tokens, strict=True)
        }
        self.head_aggregation = head_aggregation

    @classmethod
    def from_schedule(
        cls,
        schedule: str,
        blocks: list[int],
        rates: list[float],
        info,
        iterations_single: int = 50,
        iterations_multi: Sequence[int] = (30, 5, 5, 1, 1),
        similarity_tokens: int = 25,
        similarity_tokens_multi: int = 25,
        **options,
    ):
        """Single-layer: one location, ``iterations_single`` and s = ``similarity_tokens``.
        Multi-layer: the first and last locations are similarity-only (rate 1, s =
        ``similarity_tokens_multi``); a scalar keep rate applies at the locations between them."""
        if schedule == "single":
            return cls(blocks, rates, [iterations_single], [similarity_tokens], **options)
        iterations = list(iterations_multi)
        if len(iterations) != len(blocks):
            raise ReductionError(
                f"method=zerotp: {len(iterations)} iteration counts method.iterations_multi={iterations} for "
                f"{len(blocks)} locations {blocks}"
            )
        if len(set(rates)) == 1 and len(blocks) > 2 and rates[0] < 1.0:
            rates = [1.0, *rates[1:-1], 1.0]
        similarity = [similarity_tokens_multi] + [0] * (len(blocks) - 2) + [similarity_tokens_multi]
        return cls(blocks, rates, iterations, similarity[: len(blocks)], **options)

    def locations(self) -> list[Location]:
        return [
            Location(Site.AFTER, b) for b, (rate, _, s) in sorted(self.stages.items()) if rate < 1.0 or s > 0
        ]

    def needs(self, block: int) -> AttentionNeeds:
        active = Location(Site.AFTER, block) in self.locations()
        return AttentionNeeds(probs=active, keys=active and self.stages[block][2] > 0)

    def bind(self, info) -> None:
        super().bind(info)
        n = info.num_patches
        for loc in self.locations():
            rate, iterations, s = self.stages[loc.block]
            candidates = min(n, keep_floor(n, rate) + s)
            if s > candidates // 2:
                log.warning(
                    "zerotp %s: the similarity stage can drop at most half of its %d candidates; s=%d is "
                    "clamped to %d",
                    loc,
                    candidates,
                    s,
                    candidates // 2,
                )
                s = candidates // 2
                self.stages[loc.block] = (rate, iterations, s)
            n = candidates - s
            if n < 1:
                raise ReductionError(f"method=zerotp {loc} would keep no token; raise the keep rate")

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each location (bound): ``int(n*K) + s`` candidates, less ``s``."""
        n, out = self.info.num_patches, {}
        for loc in self.locations():
            rate, _, s = self.stages[loc.block]
            n = out[loc] = min(n, keep_floor(n, rate) + s) - s
        return out

    def importance(self, probs: Tensor, iterations: int) -> Tensor:
        per_head = weighted_pagerank(probs, iterations)
        if self.head_aggregation == "rms":
            return per_head.pow(2).mean(dim=1).sqrt()
        return per_head.mean(dim=1)

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        rate, iterations, s = self.stages[loc.block]
        p, n = tokens.num_prefix, tokens.n
        score = self.importance(attn.probs, iterations)[:, p:]
        candidates = score.topk(min(n, keep_floor(n, rate) + s), dim=1, sorted=True).indices
        if s == 0:
            return tokens.keep(candidates)
        keys = attn.keys.transpose(1, 2).flatten(2)[:, p:]  # [B, n, D]: heads concatenated
        survivors = sequential_partition_prune(
            gather_rows(keys, candidates), gather_rows(score, candidates), s
        )
        return tokens.keep(gather_rows(candidates, survivors))
