"""K-Medoids clustering (Haurum et al. 2023's merging baseline): each cluster kept as its medoid.

Before block l+1 (after block l), the patches are clustered into ``k = int(n0 * rho_j)`` clusters
and each cluster is represented by its medoid token (the token itself, not an average). As in
Haurum's ``k_medoids_fit`` with attention weights:

* weight ``w_j``: the attention block l paid to patch j, summed over heads and over all queries
  (prefix queries included);
* the initial medoids are the ``k`` patches of highest weight;
* ``iterations`` times: assign every patch to its nearest medoid (Euclidean distance of the
  tokens; the first medoid on a tie), then make each cluster's medoid the member j with the
  smallest ``w_j * sum_i d(j, i)``, the sum running over *all* patches (the reference's cost;
  a textbook medoid would sum over the cluster's members only);
* the output is the medoids in cluster order; token maps show each medoid's cluster.

Cost: the distance matrix of the n patches, n^2 * D multiply-adds (counted; measure/flops.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine import AttentionInfo, AttentionNeeds, Location, ReductionError, Site, Tokens, gather_rows
from ..engine.registry import register_method
from .common.absolute import AbsoluteStages, merge_clusters


def k_medoids(x: Tensor, weight: Tensor, k: int, iterations: int) -> tuple[Tensor, Tensor]:
    """Medoid indices [B, k] and the assignment [B, n] of ``x`` [B, n, D] weighted by ``weight`` [B, n]."""
    distances = torch.cdist(x, x)
    cost = weight * distances.sum(dim=-1)  # [B, n]: w_j * sum_i d(j, i)
    medoids = weight.topk(k, dim=1).indices
    clusters = torch.arange(k, device=x.device)
    for _ in range(iterations):
        assignment = gather_rows(distances.transpose(1, 2), medoids).argmin(dim=1)  # [B, n]
        member = assignment[:, None, :] == clusters[None, :, None]  # [B, k, n]
        masked = torch.where(member, cost[:, None, :], torch.full_like(cost[:, None, :], torch.inf))
        updated = masked.argmin(dim=-1)
        medoids = torch.where(member.any(dim=-1), updated, medoids)  # an empty cluster keeps its medoid
    assignment = gather_rows(distances.transpose(1, 2), medoids).argmin(dim=1)
    return medoids, assignment


@register_method(
    "kmedoids",
    kind="training-free",
    operation="merging",
    needs=("attention_probs",),
    keep_rule="int(n0*rho^j) medoids",
    paper="Haurum et al. 2023",
    reference="Haurum et al.'s TokenReduction code",
    order=11,
    colour="#aec7e8",
)
class KMedoids(AbsoluteStages):
    site = Site.AFTER

    def __init__(
        self, blocks: Sequence[int], ratios: Sequence[float], iterations: int = 3, seed: int = 0
    ) -> None:
        super().__init__(blocks, ratios, seed=seed)
        if iterations < 0:
            raise ReductionError(f"method.iterations={iterations} must be >= 0")
        self.iterations = iterations

    def needs(self, block: int) -> AttentionNeeds:
        return AttentionNeeds(probs=block in self.blocks)

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        k = self.counts[self.stage(loc)]
        p = tokens.num_prefix
        weight = attn.probs.sum(dim=(1, 2))[:, p:]  # attention received, over heads and queries
        medoids, assignment = k_medoids(tokens.patches, weight, k, self.iterations)
        return merge_clusters(tokens, assignment, k, gather_rows(tokens.patches, medoids))
