"""DPC-KNN clustering (Haurum et al. 2023's merging baseline, after TCFormer's CTM): clusters averaged.

Before block l+1 (after block l), the patches are clustered by density-peaks clustering with
k-nearest-neighbour density into ``c = int(n0 * rho_j)`` clusters, and each cluster becomes the
mean of its members. As in Haurum's ``cluster_dpc_knn`` with equal token weights:

* distances ``d = cdist(x, x) / sqrt(D)``; density ``rho_i = exp(-mean of the squared distances to
  the k nearest tokens)`` (the token itself among them) plus uniform noise of amplitude
  ``density_noise`` (1e-6, drawn from the method's seeded generator) against ties;
* ``delta_i``: the distance to the nearest token of higher density (for the densest token: the
  largest distance in the image); score ``rho_i * delta_i``; the ``c`` best-scoring tokens are the
  centres, in score order;
* every token joins its nearest centre (each centre its own cluster); a cluster's token is
  ``sum(x) / (count + 1e-6)``, the reference's normalisation.

Only the training-free, equal-weight form: TCFormer's learned token-score weights are not offered.
Cost: the distance matrix, n^2 * D multiply-adds (counted; measure/flops.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine import AttentionInfo, Location, ReductionError, Site, Tokens, gather_rows
from ..engine.registry import register_method
from .common.absolute import AbsoluteStages, merge_clusters


def dpc_knn(x: Tensor, clusters: int, neighbours: int, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Centre indices [B, c] and assignment [B, n] of ``x`` [B, n, D]; ``noise`` [B, n] breaks ties."""
    batch, n, dim = x.shape
    distances = torch.cdist(x, x) / math.sqrt(dim)
    nearest = distances.topk(neighbours, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp() + noise
    denser = density[:, None, :] > density[:, :, None]  # [B, i, j]: j is denser than i
    largest = distances.flatten(1).amax(dim=-1)[:, None, None]
    delta = torch.where(denser, distances, largest).amin(dim=-1)
    centres = (delta * density).topk(clusters, dim=-1).indices
    assignment = gather_rows(distances, centres).argmin(dim=1)
    own = torch.arange(clusters, device=x.device).expand(batch, -1)
    assignment = assignment.scatter(1, centres, own)
    return centres, assignment


@register_method(
    "dpcknn",
    kind="training-free",
    operation="merging",
    keep_rule="int(n0*rho^j) cluster means",
    paper="Haurum et al. 2023, after TCFormer's DPC-KNN (Zeng et al. 2022)",
    reference="Haurum et al.'s TokenReduction code (--equal_weight)",
    order=12,
    colour="#ffbb78",
)
class DPCKNN(AbsoluteStages):
    site = Site.AFTER

    def __init__(
        self,
        blocks: Sequence[int],
        ratios: Sequence[float],
        neighbours: int = 5,
        density_noise: float = 1e-6,
        seed: int = 0,
    ) -> None:
        super().__init__(blocks, ratios, seed=seed)
        if neighbours < 1:
            raise ReductionError(f"method.neighbours={neighbours} must be >= 1")
        self.neighbours = neighbours
        self.density_noise = density_noise

    def bind(self, info) -> None:
        super().bind(info)
        if self.neighbours > info.num_patches:
            raise ReductionError(
                f"method.neighbours={self.neighbours} exceeds the {info.num_patches} patches"
            )

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        c = self.counts[self.stage(loc)]
        x = tokens.patches
        g = self.generator(x.device)
        noise = torch.rand(x.shape[:2], device=x.device, dtype=x.dtype, generator=g) * self.density_noise
        _, assignment = dpc_knn(x, c, min(self.neighbours, tokens.n), noise)
        index = assignment[..., None].expand(-1, -1, x.shape[-1])
        total = x.new_zeros(x.shape[0], c, x.shape[-1]).scatter_add(1, index, x)
        count = x.new_zeros(x.shape[0], c, 1).scatter_add(
            1, assignment[..., None], torch.ones_like(x[..., :1])
        )
        return merge_clusters(tokens, assignment, c, total / (count + 1e-6))
