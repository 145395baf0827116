"""MCTF (Lee et al., CVPR 2024): multi-criteria token fusion with one-step-ahead attention.

Where: inside block l, before its attention (``Site.AHEAD``), in blocks 1..11 (the official
``--activate_layer [1,...,11]`` of DeiT-T/S). Block l's attention probabilities are computed on the
tokens before the step (queries and keys only: the one-step-ahead attention), the tokens are fused
with them, the attention is fused alike (columns summed, rows pooled) and block l applies it to the
fused tokens' values (``one_step_ahead="merged"``, the official ``1``). ``"precise"`` (official
``2``) recomputes block l's attention on the fused tokens instead; ``"off"`` (official ``0``) fuses
after block l with block l's own attention.

The step, per image, on the whole sequence (prefix included) split by position into A (even) and
B (odd), as ToMe:

* weight of each pair (a, b): ``W_sim * W_info * W_size`` with ``W_sim = ((cos(x_a, x_b) + 1)/2)^(1/tau_sim)``
  on the block's input tokens x (not the keys), ``W_info = (i_a * i_b)^(1/tau_info)`` with
  ``i = 1 / (attention each token receives, averaged over heads and queries)`` divided by its
  maximum, ``W_size = (z_a * z_b)^(1/tau_size)`` with ``z = 1/size`` divided by its maximum (1
  before the first fusion). A temperature of 0 drops its criterion;
* bidirectional bipartite soft matching: the ``r // 2`` A tokens of highest best weight fuse into
  their best B token, then the ``r - r // 2`` B tokens (those that just received A tokens included)
  of highest best weight over the remaining A fuse into their best of those, on the same weights;
  ``bidirectional=false``: r from A to B;
* pooling (``pooling``): ``attention`` (official ``1``): mean weighted by received attention times
  size; ``size`` (ToMe's size-weighted mean), ``max``, ``mean``. Sizes add up.

Output order as the official code: the remaining A (ascending position, B tokens fused in), then the
remaining B by descending best weight (bidirectional) or all B (one direction).

Count: ``r = min(r, n // 2)`` of the current n patches per block, ``int(n * r)`` for ``r < 1``
(MCTF-Fast's 0.35), and ``r = P + n - 10`` when fewer than 10 tokens would remain (the official
clamp, P the prefix tokens); ``method.r`` per block, or ``n - int(n*K)`` of the current n from the
keep rate (single-layer always). Later blocks add ``log(size)`` to their attention (``prop_attn``,
official on). Deviations: a DIST token is a prefix token here (never fused; placed second); the
official model has none. docs/methods/mctf.md.

Cost: the A x B similarity of the tokens (``ceil(N/2) * floor(N/2) * D`` per image and block, N
tokens with the prefix), counted as the method's own step; the one-step-ahead attention's queries,
keys and ``Q K^T`` on the N tokens before the step are counted in the block, which then computes
only values, ``A V`` and the projection on the fused tokens. Everything else is element-wise or
index work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
)
from ..engine.registry import register_method
from .common.keep import tome_single_layer_r

# Official one_step_ahead 1, 2 and 0.
ONE_STEP_AHEAD = ("merged", "precise", "off")
# Official pooling_type 1, 0, 2 and 3.
POOLINGS = ("attention", "size", "max", "mean")
# The official clamp: a step never leaves fewer tokens than this (prefix included).
MIN_TOKENS = 10


def merge_count(r: float, n: int, num_prefix: int) -> int:
    """Patches one MCTF step removes from ``n`` (the official count).

    Args:
        r: tokens per step (``r >= 1``) or the fraction of the current patches (``r < 1``).
        n: the current patches.
        num_prefix: the prefix tokens (CLS, DIST), counted by the clamp to 10 tokens.

    Returns:
        ``min(r or int(n * r), n // 2)``, with ``r`` lowered to ``P + n - 10`` when the step would
        leave fewer than 10 tokens; never below 0.
    """
    tokens = n + num_prefix
    if tokens - r < MIN_TOKENS:
        r = tokens - MIN_TOKENS
    count = int(n * r) if r < 1 else int(r)
    return max(0, min(count, n // 2))


@dataclass
class Matching:
    """Which tokens fuse where, as indices into the A (even) and B (odd) halves of the sequence.

    ``kept_a`` [B, ka]: A tokens that stay (then B tokens may fuse into them); ``src_a`` / ``dst_b``
    [B, r1]: A tokens fused and the B tokens they join; ``kept_b`` [B, kb]: B tokens that stay, in
    output order; ``src_b`` / ``dst_a`` [B, r2]: B tokens fused in the second direction and their
    position in ``kept_a`` (empty in one direction).
    """

    kept_a: Tensor
    src_a: Tensor
    dst_b: Tensor
    kept_b: Tensor
    src_b: Tensor
    dst_a: Tensor
    num_prefix: int


def pair_weights(
    x: Tensor,
    probs: Tensor | None,
    size: Tensor | None,
    tau_sim: float,
    tau_info: float,
    tau_size: float,
) -> Tensor:
    """[B, ceil(N/2), floor(N/2)]: the multi-criteria weight of each (A, B) pair.

    Args:
        x: [B, N, D] the tokens (prefix included).
        probs: [B, H, N, N] attention probabilities on them, or None (no informativeness).
        size: [B, N, 1] token sizes, or None (no size criterion: before the first fusion).
        tau_sim, tau_info, tau_size: temperatures; 0 drops the criterion.

    Returns:
        The product of the criteria's weights.
    """
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    if tau_sim:
        weight = ((a @ b.transpose(1, 2) + 1) / 2) ** (1 / tau_sim)
    else:
        weight = x.new_ones(x.shape[0], a.shape[1], b.shape[1])
    if tau_info > 0 and probs is not None:
        info = 1 / probs.mean(dim=(1, 2))
        info = info / info.amax(dim=1, keepdim=True)
        weight = weight * (info[:, ::2, None] * info[:, None, 1::2]) ** (1 / tau_info)
    if tau_size and size is not None:
        small = 1 / size
        small = small / small.amax(dim=1, keepdim=True)
        weight = weight * (small[:, ::2] * small[:, 1::2].transpose(1, 2)) ** (1 / tau_size)
    return weight


@torch.no_grad()
def match(weight: Tensor, r: int, num_prefix: int, bidirectional: bool) -> Matching:
    """Bidirectional bipartite soft matching of ``r`` tokens on the pair weights [B, A, B].

    Args:
        weight: :func:`pair_weights` (changed in place: prefix pairs set to -inf).
        r: tokens to remove (at most half of the patches).
        num_prefix: 0, 1 (CLS: A's first) or 2 (and DIST: B's first); never fused.
        bidirectional: ``r // 2`` from A to B, then ``r - r // 2`` from B to A; else ``r`` A to B.

    Returns:
        The indices of the fusion.
    """
    r_ab, r_ba = (r // 2, r - r // 2) if bidirectional else (r, 0)
    if num_prefix >= 1:
        weight[:, 0, :] = -math.inf
    if num_prefix == 2:
        weight[:, :, 0] = -math.inf
    best, best_b = weight.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    kept_a, src_a = order[:, r_ab:], order[:, :r_ab]
    dst_b = best_b.gather(1, src_a)
    if num_prefix >= 1:
        kept_a = kept_a.sort(dim=1).values  # CLS back to the front
    nb = weight.shape[2]
    if not bidirectional:
        kept_b = torch.arange(nb, device=weight.device).expand(weight.shape[0], nb)
        empty = kept_a[:, :0]
        return Matching(kept_a, src_a, dst_b, kept_b, empty, empty, num_prefix)
    back = weight.gather(1, kept_a[..., None].expand(-1, -1, nb)).transpose(1, 2)
    best_back, best_a = back.max(dim=-1)
    order_b = best_back.sort(dim=-1, descending=True).indices
    kept_b, src_b = order_b[:, r_ba:], order_b[:, :r_ba]
    if num_prefix == 2:  # DIST (B's first, weight -inf) to the front of the kept B, others in order
        kept_b = kept_b.gather(1, (kept_b != 0).to(torch.uint8).sort(dim=1, stable=True).indices)
    return Matching(kept_a, src_a, dst_b, kept_b, src_b, best_a.gather(1, src_b), num_prefix)


def destinations(matching: Matching) -> Tensor:
    """[B, N] the output position of every input token, in the official order (kept A, then kept
    B; with a DIST token ``[CLS, DIST, other kept A, other kept B]``), fused tokens at the position
    of the token they end in (an A token fused into a B token that itself fused into an A token
    ends there).

    Args:
        matching: from :func:`match`.

    Returns:
        The positions, in ``0 .. N - r - 1``.
    """
    kept_a, kept_b = matching.kept_a, matching.kept_b
    batch, ka, kb = kept_a.shape[0], kept_a.shape[1], kept_b.shape[1]
    na, nb = ka + matching.src_a.shape[1], kb + matching.src_b.shape[1]
    pos_a = torch.arange(ka, device=kept_a.device).expand(batch, ka)
    pos_b = torch.arange(ka, ka + kb, device=kept_a.device).expand(batch, kb)
    if matching.num_prefix == 2:
        pos_a = pos_a + (pos_a > 0).to(pos_a.dtype)
        pos_b = torch.where(pos_b == ka, 1, pos_b)
    to_b = kept_b.new_empty(batch, nb).scatter_(1, kept_b, pos_b)
    to_b.scatter_(1, matching.src_b, pos_a.gather(1, matching.dst_a))
    to_a = kept_a.new_empty(batch, na).scatter_(1, kept_a, pos_a)
    to_a.scatter_(1, matching.src_a, to_b.gather(1, matching.dst_b))
    dest = to_a.new_empty(batch, na + nb)
    dest[:, ::2], dest[:, 1::2] = to_a, to_b
    return dest


def combine(t: Tensor, dest: Tensor, count: int, mode: str, dim: int = 1) -> Tensor:
    """Sum (``mode="sum"``) or maximum (``"amax"``) of the tokens of ``t`` along ``dim`` that go to
    each of ``count`` output positions ``dest`` [B, N].

    Args:
        t: tokens along ``dim`` (features, sizes, attention rows or columns), images along dim 0.
        dest: from :func:`destinations`.
        count: the tokens after the step.
        mode: ``sum`` or ``amax``.
        dim: the token dimension.

    Returns:
        ``t`` with ``count`` tokens along ``dim``.
    """
    shape = list(t.shape)
    shape[dim] = count
    if dim == 1 and mode == "sum":  # whole rows: one index per row of the flattened batch
        batch, n = t.shape[:2]
        flat = (dest + torch.arange(batch, device=dest.device)[:, None] * count).reshape(-1)
        out = t.new_zeros(batch * count, *shape[2:]).index_add_(0, flat, t.reshape(batch * n, *shape[2:]))
        return out.view(shape)
    view = [1] * t.dim()
    view[0], view[dim] = dest.shape
    index = dest.view(view).expand_as(t)
    if mode == "sum":
        return t.new_zeros(shape).scatter_add_(dim, index, t)
    return t.new_zeros(shape).scatter_reduce_(dim, index, t, reduce=mode, include_self=False)


def fuse(
    tokens: Tokens, probs: Tensor | None, matching: Matching, pooling: str, fuse_attention: bool
) -> tuple[Tokens, Tensor | None]:
    """The fused tokens, and (``fuse_attention``) the attention of the fused tokens.

    Args:
        tokens: the tokens before the step.
        probs: [B, H, N, N] the attention the criteria used (the pooling weights read it).
        matching: from :func:`match`.
        pooling: one of :data:`POOLINGS`.
        fuse_attention: also fuse ``probs``: columns of fused keys summed, rows pooled as the tokens.

    Returns:
        The fused token state and the fused attention [B, H, N', N'] (None unless asked).
    """
    x = tokens.x
    size = tokens.size if tokens.size is not None else x.new_ones(*x.shape[:2], 1)
    dest = destinations(matching)
    count = matching.kept_a.shape[1] + matching.kept_b.shape[1]

    def pooled(t: Tensor, mode: str = "sum", dim: int = 1) -> Tensor:
        return combine(t, dest, count, mode, dim)

    columns = pooled(probs, dim=3) if fuse_attention else None
    attention = None
    with torch.no_grad():
        new_size = pooled(size)
    if pooling == "attention":
        with torch.no_grad():
            received = probs.mean(dim=(1, 2))[..., None]  # [B, N, 1]
            share = size / size.amax(dim=1, keepdim=True)
            norm = pooled(received * share)
        if columns is not None:
            attention = pooled(columns * received[:, None] * share[:, None], dim=2) / norm[:, None]
        x = pooled(x * received * share) / norm
    elif pooling == "size":
        if columns is not None:
            attention = pooled(columns * size[:, None], dim=2) / new_size[:, None]
        x = pooled(x * size) / new_size
    elif pooling == "max":
        if columns is not None:
            attention = pooled(columns, "amax", dim=2)
        x = pooled(x, "amax")
    else:  # mean: every fused token counts once, whatever its size
        with torch.no_grad():
            fused_count = pooled(torch.ones_like(size))
        if columns is not None:
            attention = pooled(columns, dim=2) / fused_count[:, None]
        x = pooled(x) / fused_count
    p = tokens.num_prefix
    x = torch.cat([tokens.x[:, :p], x[:, p:]], dim=1)  # x * w / w: the prefix as it came, not an ulp off
    source = None
    if tokens.source is not None:
        source = pooled(tokens.source.to(x.dtype), "amax").bool()
    return Tokens(x, p, size=new_size, source=source), attention


@register_method(
    "mctf",
    kind="training-free",
    operation="merging",
    needs=("attention_probs",),
    keep_rule="n - min(r, n//2) per block (r = method.r, or n - int(n*K))",
    paper="Lee et al., MCTF, CVPR 2024",
    reference="official MCTF (mlvlab/MCTF)",
    order=22,
    colour="#7b4173",
)
class MCTF(TokenReducer):
    # Checks of the conformance kit this method cannot meet, and why.
    conformance_exceptions: ClassVar[dict[str, str]] = {
        "gflops": (
            "one-step-ahead attention: a fusing block computes queries, keys and Q K^T on the tokens "
            "before the step and only values, A V and the projection on the fused ones, so its "
            "attention follows the closed form for no single token count (tests/methods/test_mctf.py "
            "counts it by hand)"
        ),
    }

    def __init__(
        self,
        blocks: Sequence[int],
        r: Sequence[float],
        one_step_ahead: str = "merged",
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        bidirectional: bool = True,
        pooling: str = "attention",
        prop_attn: bool = True,
        from_rates: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if one_step_ahead not in ONE_STEP_AHEAD:
            raise ReductionError(
                f"method.one_step_ahead={one_step_ahead!r} is not one of {list(ONE_STEP_AHEAD)}"
            )
        if pooling not in POOLINGS:
            raise ReductionError(f"method.pooling={pooling!r} is not one of {list(POOLINGS)}")
        if len(blocks) != len(r) or any(v < 0 for v in r):
            raise ReductionError(f"method=mctf: r={list(r)} must be one count >= 0 per block {list(blocks)}")
        self.r = {int(b): float(v) for b, v in zip(blocks, r, strict=True)}
        self.one_step_ahead, self.pooling = one_step_ahead, pooling
        self.tau_sim, self.tau_info, self.tau_size = float(tau_sim), float(tau_info), float(tau_size)
        self.bidirectional, self.prop_attn, self.from_rates = bool(bidirectional), bool(prop_attn), from_rates

    @classmethod
    def from_schedule(cls, schedule: str, blocks: list[int], rates: list[float], info, r=None, **options):
        """``method.r`` per block (multi-layer), or ``n - int(n * K)`` of the current n, as the
        official count then limits it (half the patches, 10 tokens left)."""
        if schedule == "multi" and r is not None:
            r = [float(r)] * len(blocks) if isinstance(r, int | float) else [float(v) for v in r]
            return cls(blocks, r, **options)
        low = [float(k) for k in rates if float(k) < 0.5]
        if low:
            raise ReductionError(
                f"method=mctf fuses at most half of a layer's tokens (bipartite matching): keep rates "
                f"{low} are below 0.5. Use keep_rate >= 0.5, or schedule=multi with method.r (official: 16 "
                f"in blocks 1-11)"
            )
        n, counts = info.num_patches, []
        for rate in rates:
            counts.append(merge_count(tome_single_layer_r(n, rate), n, info.num_prefix))
            n -= counts[-1]
        return cls(blocks, counts, from_rates=True, **options)

    def resolved_schedule(self) -> dict[str, Any]:
        """The tokens removed per block; keep rates only when they set them."""
        r = [self.r[b] for b in sorted(self.r)]
        return {"r": r} if self.from_rates else {"rates": None, "r": r}

    def bind(self, info) -> None:
        if info.num_prefix > 2:
            raise ReductionError(
                f"method=mctf keeps at most 2 prefix tokens (CLS, DIST) apart, not {info.num_prefix}"
            )
        super().bind(info)

    def locations(self) -> list[Location]:
        site = Site.AFTER if self.one_step_ahead == "off" else Site.AHEAD
        return [Location(site, b) for b, r in sorted(self.r.items()) if r > 0]

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each location (bound): the official count, the kit's keep rule."""
        n, out = self.info.num_patches, {}
        for loc in self.locations():
            n = out[loc] = n - merge_count(self.r[loc.block], n, self.info.num_prefix)
        return out

    def needs(self, block: int) -> AttentionNeeds:
        """The probabilities of every fusing block: ``off`` reads them after the block; ``merged``
        gets them before its attention (``Site.AHEAD``) and replaces the block's attention with
        their fused form; ``precise`` asks nothing of the attention it recomputes."""
        return AttentionNeeds(probs=self.one_step_ahead != "precise" and self.r.get(block, 0) > 0)

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        probs = attn.probs
        ahead = loc.site is Site.AHEAD
        if ahead:
            attn.probs = None  # the block recomputes its attention unless the fused one is handed over
        r = merge_count(self.r[loc.block], tokens.n, tokens.num_prefix)
        if r <= 0:
            return tokens
        with torch.no_grad():
            weight = pair_weights(tokens.x, probs, tokens.size, self.tau_sim, self.tau_info, self.tau_size)
        matching = match(weight, r, tokens.num_prefix, self.bidirectional)
        fuse_attention = ahead and self.one_step_ahead == "merged"
        tokens, fused = fuse(tokens, probs, matching, self.pooling, fuse_attention)
        if fuse_attention:
            attn.probs = fused
        return tokens

    def extra_repr(self) -> str:
        return f"one_step_ahead={self.one_step_ahead}, pooling={self.pooling}, " + super().extra_repr()
