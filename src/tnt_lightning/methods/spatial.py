"""Spatial heuristics (Haurum et al. 2023): keep the patches within a distance of the image centre.

Before block l+1 (after block l), keep the patches whose L1 / L2 / Linf distance from the centre
of the patch grid is at most a threshold. The threshold is the one whose number of patches
within it is closest to the target ``int(n0 * rho_j)`` (the smaller one on a tie), so the kept
count is that achievable count, not the target itself. The kept sets are nested discs, squares
or diamonds around the centre, the same for every image; nothing is computed from the tokens.

Grid coordinates (``method.grid``): ``haurum`` (default) reproduces the reference exactly:
``linspace(-P//2, P//2, P)`` in float32 for a grid side P. Its float rounding splits some exact
L1 ties (2.15 + 2.15 vs 1.08 + 3.23), so a threshold can cut a diamond ring, and for an odd P
(``-P//2`` rounds down) the grid is off centre. ``centred``: exact coordinates ``i - (P-1)/2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..engine import AttentionInfo, BackboneInfo, Location, ReductionError, Site, Tokens
from ..engine.registry import register_method
from .common.absolute import AbsoluteStages

PATTERNS = ("l1", "l2", "linf")
GRIDS = ("haurum", "centred")


def centre_distances(side: int, pattern: str, grid: str = "haurum") -> torch.Tensor:
    """[side * side] distance of every patch (row-major) from the grid centre."""
    if grid == "haurum":
        coords = torch.linspace(-side // 2, side // 2, steps=side, dtype=torch.float32)
    else:
        coords = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    if pattern == "l1":
        d = rows.abs() + cols.abs()
    elif pattern == "l2":
        d = (rows * rows + cols * cols).sqrt()
    else:
        d = torch.maximum(rows.abs(), cols.abs())
    return d.flatten()


def threshold_for(distances: torch.Tensor, target: int) -> float:
    """The distance whose count of patches within it is closest to ``target`` (smaller on a tie)."""
    best, best_gap = None, math.inf
    for d in torch.unique(distances).tolist():
        gap = abs(int((distances <= d).sum()) - target)
        if gap < best_gap:
            best, best_gap = d, gap
    return best


@register_method(
    "spatial",
    kind="training-free",
    operation="pruning",
    keep_rule="the achievable count nearest int(n0*rho^j)",
    paper="Haurum et al. 2023",
    reference="Haurum et al.'s TokenReduction code",
    order=10,
    colour="#1f77b4",
)
class SpatialHeuristic(AbsoluteStages):
    site = Site.AFTER

    def __init__(
        self,
        blocks: Sequence[int],
        ratios: Sequence[float],
        pattern: str = "l1",
        grid: str = "haurum",
        seed: int = 0,
    ) -> None:
        super().__init__(blocks, ratios, seed=seed)
        if pattern not in PATTERNS:
            raise ReductionError(f"method.pattern={pattern!r} is not one of {list(PATTERNS)}")
        if grid not in GRIDS:
            raise ReductionError(f"method.grid={grid!r} is not one of {list(GRIDS)}")
        self.pattern, self.grid = pattern, grid
        self.kept_positions: list[list[int]] = []

    def bind(self, info: BackboneInfo) -> None:
        super().bind(info)
        side = math.isqrt(info.num_patches)
        if side * side != info.num_patches:
            raise ReductionError(f"method=spatial needs a square patch grid, not {info.num_patches} patches")
        distances = centre_distances(side, self.pattern, self.grid)
        self.kept_positions = []
        for target in self.counts:
            threshold = threshold_for(distances, target)
            self.kept_positions.append((distances <= threshold).nonzero().flatten().tolist())
        self.counts = [len(kept) for kept in self.kept_positions]

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        stage = self.stage(loc)
        kept = self.kept_positions[stage]
        if stage > 0:  # the sets are nested: positions among the previous stage's survivors
            previous = {pos: i for i, pos in enumerate(self.kept_positions[stage - 1])}
            kept = [previous[pos] for pos in kept]
        idx = torch.tensor(kept, device=tokens.x.device).expand(tokens.x.shape[0], -1)
        return tokens.keep(idx)

    def extra_repr(self) -> str:
        return f"{self.pattern}, counts={self.counts}, " + super().extra_repr()
