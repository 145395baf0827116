"""Similarity pruning: drop the tokens most redundant with others (TNT's RPSP, Zero-TP's S-stage).

Both split the candidates into a group A (may be dropped) and a group B, and drop the ``r``
members of A whose best cosine match in B is highest. They differ in the split: a random
permutation shared by the batch (TNT, docs/methods/tnt.md#rpsp) or the importance order (Zero-TP, 7.3).
Functions return indices into the candidates, so callers can carry sizes and sources along.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...engine import complement, gather_rows


def _most_redundant(features: Tensor, a_idx: Tensor, b_idx: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """For A and B given as [B, |A|] / [B, |B|] indices: the kept and the dropped members of A
    (as [B, .] indices, each in A's order), and each dropped member's best match in B.

    Index arithmetic of static shape (no boolean indexing), so that ``torch.compile`` traces it.
    """
    a = F.normalize(gather_rows(features, a_idx), dim=-1)
    b = F.normalize(gather_rows(features, b_idx), dim=-1)
    best, match = (a @ b.transpose(1, 2)).max(dim=-1)
    dropped = best.topk(r, dim=1, largest=True, sorted=False).indices.sort(dim=1).values
    kept = complement(dropped, a_idx.shape[1])
    dropped_match = gather_rows(b_idx, gather_rows(match, dropped))
    return gather_rows(a_idx, kept), gather_rows(a_idx, dropped), dropped_match


def _random_partition(
    batch: int, m: int, device: torch.device, generator: torch.Generator | None, per_sample: bool
) -> tuple[Tensor, Tensor]:
    """Groups A (first M // 2 of a random permutation) and B (the rest), as [B, .] indices.

    The official code draws one permutation per call, shared by the batch (so results depend on
    the batch size); ``per_sample`` draws one per sample.
    """
    if per_sample:
        perm = torch.rand(batch, m, device=device, generator=generator).argsort(dim=1)
    else:
        perm = torch.randperm(m, device=device, generator=generator).expand(batch, -1)
    return perm[:, : m // 2], perm[:, m // 2 :]


def random_partition_prune(
    features: Tensor,
    importance: Tensor,
    r: int,
    keep: int,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> Tensor:
    """TNT's random-partition similarity pruning (RPSP).

    A random permutation of the M candidates: A = its first M // 2, B = the rest. Drop the ``r``
    members of A most similar to B; return the survivors' indices ordered by ``importance``
    descending, truncated to ``keep``. ``features``: [B, M, D]; ``importance``: [B, M].
    """
    batch, m, _ = features.shape
    a_idx, b_idx = _random_partition(batch, m, features.device, generator, per_sample)
    kept_a, _, _ = _most_redundant(features, a_idx, b_idx, r)
    survivors = torch.cat([kept_a, b_idx], dim=1)
    order = gather_rows(importance, survivors).argsort(dim=1, descending=True)
    return gather_rows(survivors, order)[:, :keep]


def random_partition_merge(
    features: Tensor,
    x: Tensor,
    importance: Tensor,
    r: int,
    keep: int,
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> tuple[Tensor, Tensor]:
    """RPSP's "token merge" ablation: average each dropped A token into its best B match.

    Returns the surviving indices (as :func:`random_partition_prune`) and ``x`` with the merged
    B tokens updated (an unweighted mean of each B token and the A tokens merged into it).
    """
    batch, m, dim = features.shape
    a_idx, b_idx = _random_partition(batch, m, features.device, generator, per_sample)
    kept_a, src, dst = _most_redundant(features, a_idx, b_idx, r)
    merged = x.scatter_reduce(1, dst[..., None].expand(-1, -1, dim), gather_rows(x, src), reduce="mean")
    survivors = torch.cat([kept_a, b_idx], dim=1)
    order = gather_rows(importance, survivors).argsort(dim=1, descending=True)
    return gather_rows(survivors, order)[:, :keep], merged


def sequential_partition_prune(features: Tensor, importance: Tensor, r: int) -> Tensor:
    """Zero-TP's S-stage: sort by importance, B = the more important half, drop ``r`` of A.

    Returns the survivors' indices ordered by importance, descending.
    """
    order = importance.argsort(dim=1, descending=True)
    half = order.shape[1] // 2
    b_idx, a_idx = order[:, :half], order[:, half:]
    kept_a, _, _ = _most_redundant(features, a_idx, b_idx, r)
    return torch.cat([b_idx, kept_a], dim=1)
