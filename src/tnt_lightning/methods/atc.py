"""ATC, Agglomerative Token Clustering (Haurum et al., ECCV 2024): bottom-up clustering of the patches.

Where: inside block l, after the attention residual and before the MLP (the official
``Block_ATC``), at the official ``--reduction_loc 3 6 9`` (0-indexed) for the DeiT runs.

Per image, on block l's keys averaged over heads, prefix tokens left out:

* cosine distances ``d_ij = 1 - <k_i, k_j> / (|k_i| |k_j|)`` between the n patches;
* agglomerative clustering: every patch starts as its own cluster and the two closest clusters are
  joined until ``k`` remain. The distance of a joined cluster to any other is the minimum
  (``single``), maximum (``complete``) or size-weighted mean (``average``) of its two parts'
  distances, the Lance-Williams update, which gives exactly what scikit-learn's
  ``AgglomerativeClustering(metric="precomputed")`` and scipy's ``linkage`` give (the official code
  calls scikit-learn on the CPU, one image at a time); here it runs batched, in torch, on the
  model's device;
* each cluster becomes one token, the mean of its members' tokens weighted by their sizes. With
  ``prop_attn`` (the official ``--proportional_attn``, which its README and benchmark use) sizes
  add up and later blocks add ``log(size)`` to their attention logits; without it, as the official
  code then does, every step weighs its current tokens equally and no size is carried.

Count: stage j keeps ``k = int(n0 * rho ** j)`` clusters of the initial n0 patches (the official
``int(num_patches * reduction_ratio ** (idx + 1))``), single-layer ``int(n0 * K)``. Clusters are
numbered by their first member, so the output is in the patches' order. Deviation: a DIST token is
a prefix token here (the official DeiT model has a CLS token only).

Cost: the n x n similarity of the keys, one matrix product of n * n * D/H multiply-adds per image
and location (counted). The n - k joins of the merge loop are comparisons, minima, maxima and
weighted means of rows of the distance matrix, element-wise work, free in the fvcore convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..engine import AttentionInfo, AttentionNeeds, Location, ReductionError, Site, Tokens
from ..engine.registry import register_method
from .common.absolute import AbsoluteStages, merge_clusters

LINKAGES = ("average", "complete", "single")


def cosine_distances(metric: Tensor) -> Tensor:
    """[B, n, n]: ``1 - cosine similarity`` of the rows of ``metric`` [B, n, C] (the official form)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    return 1 - metric @ metric.transpose(1, 2)


@torch.no_grad()
def agglomerate(distances: Tensor, clusters: int, linkage: str = "average") -> Tensor:
    """Agglomerative clustering of each image's points into ``clusters`` clusters.

    Args:
        distances: [B, n, n] distances; the upper triangle is read (i < j), as scipy reads it.
        clusters: how many clusters to stop at (1 <= clusters <= n).
        linkage: ``single``, ``complete`` or ``average``.

    Returns:
        [B, n] the cluster of each point, 0 .. clusters - 1, numbered by their first member.
    """
    if linkage not in LINKAGES:
        raise ReductionError(f"method.linkage={linkage!r} is not one of {list(LINKAGES)}")
    batch, n = distances.shape[:2]
    # The upper triangle mirrored, as scikit-learn and scipy read it: a matrix product need not be
    # symmetric to the last bit, and the first closest pair must have i < j.
    upper = distances.triu(diagonal=1)
    d = upper + upper.transpose(1, 2)
    d.diagonal(dim1=1, dim2=2).fill_(torch.inf)
    size = d.new_ones(batch, n)
    # Each point's cluster, named by the row holding it: the cluster's smallest member.
    owner = torch.arange(n, device=d.device).expand(batch, n).clone()
    rows = torch.arange(batch, device=d.device)
    for _ in range(n - clusters):
        # The first closest pair in row-major order (i < j), as a flat argmin would find it: the
        # first row holding the minimum, then its first column (a row minimum is much cheaper).
        kept = d.amin(dim=2).argmin(dim=1)
        gone = d[rows, kept].argmin(dim=1)
        near_kept, near_gone = d[rows, kept], d[rows, gone]  # [B, n]
        if linkage == "single":
            joined = torch.minimum(near_kept, near_gone)
        elif linkage == "complete":
            joined = torch.maximum(near_kept, near_gone)
        else:
            size_kept, size_gone = size[rows, kept, None], size[rows, gone, None]
            joined = (size_kept * near_kept + size_gone * near_gone) / (size_kept + size_gone)
            size[rows, kept] += size[rows, gone]
        joined[rows, kept] = torch.inf
        joined[rows, gone] = torch.inf
        d[rows, kept] = joined
        d[rows, :, kept] = joined
        d[rows, gone] = torch.inf
        d[rows, :, gone] = torch.inf
        owner = torch.where(owner == gone[:, None], kept[:, None], owner)
    first = owner == torch.arange(n, device=d.device)
    return (first.cumsum(dim=1) - 1).gather(1, owner)


def merge(tokens: Tokens, labels: Tensor, clusters: int, weighted: bool) -> Tokens:
    """Prefix first, then each cluster's mean token; ``weighted``: by size, sizes carried on."""
    p = tokens.num_prefix
    size = tokens.size if weighted and tokens.size is not None else tokens.x.new_ones(*tokens.x.shape[:2], 1)
    patches, patch_size = tokens.patches * size[:, p:], size[:, p:]
    index = labels[..., None]
    total = patches.new_zeros(patches.shape[0], clusters, patches.shape[-1])
    total = total.scatter_add(1, index.expand(-1, -1, patches.shape[-1]), patches)
    new_size = patch_size.new_zeros(patch_size.shape[0], clusters, 1).scatter_add(1, index, patch_size)
    out = merge_clusters(tokens, labels, clusters, total / new_size)
    return replace(out, size=torch.cat([size[:, :p], new_size], dim=1)) if weighted else out


@register_method(
    "atc",
    kind="training-free",
    operation="merging",
    needs=("keys",),
    keep_rule="int(n0*rho^j) clusters",
    paper="Haurum et al., ATC, ECCV 2024",
    reference="official ATC (JoakimHaurum/ATC)",
    order=23,
    colour="#843c39",
)
class ATC(AbsoluteStages):
    site = Site.INSIDE

    def __init__(
        self,
        blocks: Sequence[int],
        ratios: Sequence[float],
        linkage: str = "average",
        prop_attn: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(blocks, ratios, seed=seed)
        if linkage not in LINKAGES:
            raise ReductionError(f"method.linkage={linkage!r} is not one of {list(LINKAGES)}")
        self.linkage = linkage
        self.prop_attn = prop_attn
        # Location -> [B, n]: each patch's cluster at that location in the last forward.
        self.labels: dict[Location, Tensor] = {}

    def needs(self, block: int) -> AttentionNeeds:
        return AttentionNeeds(keys=block in self.blocks)

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        k = min(self.counts[self.stage(loc)], tokens.n)
        metric = attn.keys.mean(dim=1)[:, tokens.num_prefix :]
        with torch.no_grad():  # the clusters are a choice, not a function to differentiate
            labels = agglomerate(cosine_distances(metric), k, self.linkage)
        self.labels[loc] = labels
        return merge(tokens, labels, k, self.prop_attn)

    def extra_repr(self) -> str:
        return f"linkage={self.linkage}, prop_attn={self.prop_attn}, " + super().extra_repr()
