"""Methods whose stage j keeps ``int(n0 * rho_j)`` of the *initial* n0 patches (Haurum et al.'s rule).

Haurum et al.'s TokenReduction code gives every location a cumulative keep ratio relative to the
initial patches: ``rho ** (j + 1)`` for a scalar keep rate rho, as DynamicViT does
(docs/methods/conventions.md#keep-count-rules).
Per-location rates ``r_j`` (``schedule.rates``) give ``r_1 * ... * r_j``. Single-layer: one stage
keeping ``int(n0 * K)``. Also: merging clusters into one token each, with their sources traced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ...engine import BackboneInfo, Location, ReductionError, Site, TokenReducer, Tokens
from .keep import keep_cumulative


def cumulative_ratios(rates: Sequence[float]) -> list[float]:
    """Keep ratios relative to the initial tokens: ``rho ** (j+1)`` for equal rates, else running products."""
    if len(set(rates)) == 1:
        return [rates[0] ** (j + 1) for j in range(len(rates))]
    return [float(torch.tensor(rates[: j + 1], dtype=torch.float64).prod()) for j in range(len(rates))]


class AbsoluteStages(TokenReducer):
    """Acts at ``site`` of each of ``blocks``; stage j keeps ``int(n0 * ratios[j])`` patches."""

    site: ClassVar[Site]

    def __init__(self, blocks: Sequence[int], ratios: Sequence[float], seed: int = 0) -> None:
        super().__init__(seed=seed)
        blocks, ratios = [int(b) for b in blocks], [float(r) for r in ratios]
        if len(blocks) != len(ratios):
            raise ReductionError(
                f"method={self.name}: {len(ratios)} keep ratios for {len(blocks)} blocks {blocks}"
            )
        if len(set(blocks)) != len(blocks) or blocks != sorted(blocks):
            raise ReductionError(
                f"method={self.name}: schedule.blocks={blocks} must be increasing, without repeats"
            )
        if any(not 0.0 < r < 1.0 for r in ratios):
            raise ReductionError(
                f"method={self.name}: keep ratios {ratios} must lie in (0, 1); raise or lower keep_rate"
            )
        self.blocks, self.ratios = blocks, ratios
        self.counts: list[int] = []

    @classmethod
    def from_schedule(
        cls, schedule: str, blocks: list[int], rates: list[float], info: BackboneInfo, **options
    ):
        ratios = rates if schedule == "single" else cumulative_ratios(rates)
        return cls(blocks, ratios, **options)

    def bind(self, info: BackboneInfo) -> None:
        super().bind(info)
        self.counts = [keep_cumulative(info.num_patches, r, 1) for r in self.ratios]
        if min(self.counts) < 1:
            raise ReductionError(
                f"method={self.name}: keep ratios {self.ratios} leave no token of {info.num_patches}; "
                f"raise keep_rate"
            )

    def locations(self) -> list[Location]:
        return [Location(self.site, b) for b in self.blocks]

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each stage (bound): ``int(n0 * ratio)``, the conformance kit's rule."""
        return dict(zip(self.locations(), self.counts, strict=True))

    def stage(self, loc: Location) -> int:
        return self.blocks.index(loc.block)

    def resolved_schedule(self) -> dict[str, Any]:
        """The cumulative keep ratios and counts each stage runs with, for the record."""
        return {"keep_ratios": list(self.ratios)}


def merge_clusters(tokens: Tokens, assignment: Tensor, clusters: int, x: Tensor) -> Tokens:
    """Prefix first, then one token per cluster with features ``x`` [B, clusters, D].

    ``assignment`` [B, n]: the cluster of each non-prefix token. A cluster's source is the union of
    its members' sources (token maps colour the members by their cluster); sizes are not tracked,
    as the reference implementations do not weight attention or pooling by cluster size.
    """
    p = tokens.num_prefix
    source = None
    if tokens.source is not None:
        members = tokens.source[:, p:].to(x.dtype)
        index = assignment[..., None].expand(-1, -1, members.shape[-1])
        merged = members.new_zeros(members.shape[0], clusters, members.shape[-1])
        merged = merged.scatter_reduce(1, index, members, reduce="amax").bool()
        source = torch.cat([tokens.source[:, :p], merged], dim=1)
    return Tokens(torch.cat([tokens.prefix, x], dim=1), p, source=source)
