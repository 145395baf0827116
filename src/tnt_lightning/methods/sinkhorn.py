"""Sinkhorn merging (Haurum et al., from their MSHViT), as in the TokenReduction benchmark.

Before block l+1 (after block l), M = ``int(n0 * rho_j)`` learned cluster centres C [M, D]:

* the patches and the centres are L2-normalised (the centres *in place*, under no_grad, at every
  training forward, as the reference does: its optimiser steps are projected back to the sphere);
* scores ``S = C @ x^T`` [M, n] (cosine similarities), divided by ``eps`` (1.0);
* ``iterations`` (3, Haurum's ``--cluster_iters``) log-space Sinkhorn steps towards uniform
  marginals ``1 / (M + n)`` on both sides (the reference's, which do not sum to the same total),
  starting from zero potentials, the column step last; the plan times ``M + n`` is the assignment
  W [M, n], whose columns then sum to 1 (each patch spreads a unit of mass over the centres);
* the M output tokens are ``W @ x`` on the *normalised* patches (no division by cluster mass).

Centres start as a standard normal draw. Cost: the scores M n D and the merge M n D multiply-adds
(counted); normalisation and the Sinkhorn steps are element-wise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import BackboneInfo, ReductionError
from ..engine.registry import register_method
from .common.soft_merge import MergeStage, SoftMergeReducer


def sinkhorn_assignment(scores: Tensor, eps: float, iterations: int) -> Tensor:
    """W [B, M, n] from scores [B, M, n]: ``iterations`` log-space Sinkhorn steps, times M + n."""
    m, n = scores.shape[-2:]
    log_marginal = -math.log(m + n)
    logits = scores / eps
    u = scores.new_zeros(scores.shape[:-1])  # row (centre) potentials
    v = scores.new_zeros(scores.shape[0], n)  # column (patch) potentials
    for _ in range(iterations):
        u = log_marginal - torch.logsumexp(logits + v[:, None, :], dim=2)
        v = log_marginal - torch.logsumexp(logits + u[:, :, None], dim=1)
    return (logits + u[:, :, None] + v[:, None, :] - log_marginal).exp()


class SinkhornStage(MergeStage):
    def __init__(self, dim: int, outputs: int, eps: float, iterations: int) -> None:
        super().__init__()
        self.eps, self.iterations = eps, iterations
        self.v = nn.Parameter(torch.randn(outputs, dim))  # the centres, named as the reference's

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            with torch.no_grad():
                self.v.copy_(F.normalize(self.v, dim=-1))
        centres = F.normalize(self.v, dim=-1)  # the identity after the projection above
        x = F.normalize(x, dim=-1)
        weights = sinkhorn_assignment(centres @ x.transpose(1, 2), self.eps, self.iterations)
        return weights @ x, weights


@register_method(
    "sinkhorn",
    kind="learned",
    operation="merging",
    keep_rule="int(n0*rho^j) output tokens",
    paper="Haurum et al. 2023, from MSHViT",
    reference="Haurum et al.'s TokenReduction code",
    order=15,
    colour="#c5b0d5",
)
class Sinkhorn(SoftMergeReducer):
    def __init__(
        self,
        info: BackboneInfo,
        blocks: Sequence[int],
        ratios: Sequence[float],
        eps: float = 1.0,
        iterations: int = 3,
        seed: int = 0,
    ) -> None:
        if not eps > 0:
            raise ReductionError(f"method.eps={eps} must be > 0")
        if iterations < 1:
            raise ReductionError(f"method.iterations={iterations} must be >= 1")
        self.eps, self.iterations = float(eps), int(iterations)
        super().__init__(info, blocks, ratios, seed=seed)

    def make_stage(self, dim: int, outputs: int) -> MergeStage:
        return SinkhornStage(dim, outputs, self.eps, self.iterations)

    def options(self) -> dict[str, Any]:
        return {"eps": self.eps, "iterations": self.iterations}
