"""PPT (Wu et al., arXiv 2310.01812): per image and block, prune inattentive tokens or pool similar ones.

Where: inside block l, after the attention residual and before the MLP (the official
``pp_block_adaptive``), at the official ``--pp_loc_list 3 6 9`` for DeiT-S (0-indexed).

Per image, from block l's attention (proportional attention included):

* significance over the n non-prefix tokens: ``s_j = (sum_h A[h, CLS, j]) * ||v_j||``, where
  ``v_j`` is token j's value with all heads concatenated (the official ``score_assignment_step``),
  normalised to sum to 1 (no eps). ``score="per_head"``: ATS's form ``sum_h A[h, CLS, j] * ||v_hj||``,
  which the official code says it refines;
* ``torch.var`` of s (unbiased, n - 1). Variance ``< threshold``: **pooling**, ToMe's bipartite
  soft matching on the keys averaged over heads, size-weighted (:class:`~.tome.ToMe`). Variance
  ``>= threshold``: **pruning**, the r tokens of lowest s dropped, the survivors in descending s
  (the official order, which the next block's parity split sees). ``threshold=0``: always prune;
  ``inf``: always pool (ToMe).

Count: ``r = min(r, n // 2)`` tokens go at each location, whichever operation an image takes, so
the batch stays rectangular. ``r``: ``method.r`` per block (the README's DeiT-S: 50 at blocks 3, 6,
9 with ``threshold=7e-5`` off the shelf, 6e-5 fine-tuned: 196 -> 146 -> 96 -> 48), or from the keep
rate, ``r = n - int(n * K)`` of the current n (single-layer always; multi-layer when ``r`` is null),
which needs K >= 0.5. Later blocks add ``log(size)`` to their attention (``prop_attn``, the official
default). Deviations: a DIST token is a prefix token here (never scored, pruned or counted in the
variance; the official code scores it like a patch). docs/faithfulness.md, "PPT".

Cost: the matching's similarity matrix (pooled images only), as ToMe's; the significance, the
variance and the sort are element-wise or index work, free in the fvcore convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..engine import AttentionInfo, AttentionNeeds, Location, ReductionError, Tokens
from ..engine.registry import register_method
from .common.keep import tome_merge_count, tome_single_layer_r
from .tome import ToMe

SCORES = ("official", "per_head")


def significance(attn: AttentionInfo, num_prefix: int, per_head: bool = False) -> Tensor:
    """[B, n]: PPT's importance of each non-prefix token, normalised to sum to 1 per image."""
    cls = attn.cls_probs[:, :, 0]  # [B, H, N]
    if per_head:
        score = (cls * attn.values.norm(dim=-1)).sum(dim=1)
    else:
        score = cls.sum(dim=1) * attn.values.transpose(1, 2).flatten(2).norm(dim=-1)
    score = score[:, num_prefix:]
    return score / score.sum(dim=-1, keepdim=True)


def _rows(tokens: Tokens, idx: Tensor) -> Tokens:
    """The images ``idx`` of ``tokens``."""

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.index_select(0, idx)

    x, size, source, policy = (pick(t) for t in (tokens.x, tokens.size, tokens.source, tokens.policy))
    return Tokens(x, tokens.num_prefix, size, source, policy)


def _join(pool: Tensor, pooled: Tokens, pruned: Tokens) -> Tokens:
    """The batch back in its order from its pooled and its pruned images (equal token counts)."""
    rows = (pool.nonzero()[:, 0], (~pool).nonzero()[:, 0])

    def stack(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        if a is None:
            return None
        out = a.new_empty(pool.shape[0], *a.shape[1:])
        return out.index_copy_(0, rows[0], a).index_copy_(0, rows[1], b)

    size = pruned.size if pruned.size is not None else pruned.x.new_ones(*pruned.x.shape[:2], 1)
    source = stack(pooled.source, pruned.source)
    return Tokens(stack(pooled.x, pruned.x), pooled.num_prefix, stack(pooled.size, size), source)


@register_method(
    "ppt",
    kind="training-free",
    operation="pruning+merging",
    needs=("cls_token", "cls_attention", "keys", "values"),
    keep_rule="n - min(r, n//2) per block (r = method.r, or n - int(n*K))",
    paper="Wu et al., PPT, arXiv 2310.01812, 2023",
    reference="official PPT (xjwu1024/PPT)",
    order=17,
    colour="#dbdb8d",
)
class PPT(ToMe):
    def __init__(
        self,
        blocks: Sequence[int],
        r: Sequence[int],
        threshold: float = 7e-5,
        prop_attn: bool = True,
        score: str = "official",
        from_rates: bool = False,
        seed: int = 0,
    ) -> None:
        if score not in SCORES:
            raise ReductionError(f"method.score={score!r} is not one of {list(SCORES)}")
        if len(blocks) != len(r) or any(v < 0 for v in r):
            raise ReductionError(f"method=ppt: r={list(r)} must be one count >= 0 per block {list(blocks)}")
        super().__init__(blocks, r, prop_attn=prop_attn, seed=seed)
        self.from_rates = from_rates
        self.threshold = float(threshold)
        self.score = score
        # Location -> [B]: each image's score variance, and whether it pooled (True) or pruned there,
        # in the last forward.
        self.variances: dict[Location, Tensor] = {}
        self.pooled: dict[Location, Tensor] = {}

    @classmethod
    def from_schedule(cls, schedule: str, blocks: list[int], rates: list[float], info, r=None, **options):
        """``method.r`` tokens per block (multi-layer), or ``n - int(n * K)`` of the current n."""
        if schedule == "multi" and r is not None:
            r = [int(r)] * len(blocks) if isinstance(r, int) else [int(v) for v in r]
            return cls(blocks, r, **options)
        n, counts = info.num_patches, []
        for block, rate in zip(blocks, rates, strict=True):
            counts.append(tome_single_layer_r(n, rate))
            if counts[-1] > n // 2:
                raise ReductionError(
                    f"method=ppt removes at most half of a layer's tokens (its pooling is bipartite "
                    f"matching): keeping {n - counts[-1]} of {n} tokens inside block {block} needs "
                    f"r={counts[-1]} > {n // 2}. Use keep_rate >= 0.5, or schedule=multi with method.r"
                )
            n -= counts[-1]
        return cls(blocks, counts, from_rates=True, **options)

    def resolved_schedule(self) -> dict[str, Any]:
        """The tokens removed per block; keep rates only when they set them."""
        r = [self.r[b] for b in sorted(self.r)]
        return {"r": r} if self.from_rates else {"rates": None, "r": r}

    def bind(self, info) -> None:
        if info.num_prefix > 2:
            raise ReductionError(
                f"method=ppt pools as ToMe does, which keeps at most 2 prefix tokens (CLS, DIST) "
                f"apart, not {info.num_prefix}"
            )
        super().bind(info)

    def needs(self, block: int) -> AttentionNeeds:
        active = self.r.get(block, 0) > 0
        return AttentionNeeds(cls_probs=active, keys=active, values=active)

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        r = tome_merge_count(self.r[loc.block], tokens.n)
        if r <= 0:
            return tokens
        score = significance(attn, tokens.num_prefix, per_head=self.score == "per_head")
        variance = score.var(dim=1)
        pool = variance < self.threshold
        self.variances[loc], self.pooled[loc] = variance, pool
        if bool(pool.all()):
            return super().reduce(loc, tokens, attn)
        if not bool(pool.any()):
            return self.prune(tokens, score, r)
        where = pool.nonzero()[:, 0]
        keys = AttentionInfo(keys=attn.keys.index_select(0, where))
        pooled = super().reduce(loc, _rows(tokens, where), keys)
        rest = (~pool).nonzero()[:, 0]
        return _join(pool, pooled, self.prune(_rows(tokens, rest), score.index_select(0, rest), r))

    @staticmethod
    def prune(tokens: Tokens, score: Tensor, r: int) -> Tokens:
        """Drop the ``r`` tokens of lowest ``score``; the others in descending score, as the official code."""
        return tokens.keep(score.argsort(dim=1, descending=True)[:, : tokens.n - r])
