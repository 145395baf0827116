"""PiToMe (Tran et al., NeurIPS 2024): merge high-energy tokens, keep the isolated, low-energy ones.

Where: inside block l, after the attention residual and before the MLP (the official
``PiToMeBlock``), in every block by default (the official ``ratio`` applies to all of them).

Per image, on block l's keys averaged over heads, prefix tokens left out, cosine-normalised:

* energy of patch i over all n patches j (i itself included):
  ``E_i = mean_j elu(cos_ij - m_l, alpha)`` (``energy="official"``; ``"paper"``: ``cos_ij`` itself
  where ``cos_ij >= m_l``, ``alpha * (exp(cos_ij - m_l) - 1)`` below), with the margin
  ``m_l = margin - margin * (l / depth)`` (official ``margin=0.75``; the paper's is 0.9);
* the patches sorted by descending energy, then one of two steps (``steps``):
  **energy step**: the 2r highest-energy patches alternate into A (even ranks) and B (odd); every A
  patch merges into its most similar B patch; the others are kept. **BSM step**: all patches
  alternate into A and B by energy rank, and ToMe's bipartite soft matching merges the r
  best-matched A patches. ``steps="deit"`` (official DeiT/timm patch): BSM step in blocks
  ``l < ceil(depth / 2)``, the energy step after; ``"mae"`` the reverse (official MAE patch);
  ``"pitome"``: the energy step everywhere (the paper's algorithm); ``"bsm"``: BSM step everywhere.

Merges are size-weighted means; sizes add up. Output order as the official code: kept patches
(energy step: by descending energy; BSM step: unmerged A by descending best match), then B.

Count: ``r = floor(n - n * K)`` of the current n patches (the official ``math.floor(T - T*ratio)``),
so K >= 0.5. The official DeiT runs use K = 0.9, 0.925, 0.95, 0.975 in all 12 blocks (its
default 0.9125), the same for DeiT-B and MAE ViT-B. ``prop_attn`` is off, as in the official code
(its attention never receives the sizes). Deviation: a DIST token is a prefix token here (the
official code merges it like a patch). docs/faithfulness.md, "PiToMe".

Cost: the n x n similarity of the keys (one matrix product, n * n * D/H multiply-adds per image and
block), as ToMe's matching is counted; the energy, sorts and gathers are element-wise or index work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine import AttentionInfo, AttentionNeeds, Location, ReductionError, Site, TokenReducer, Tokens
from ..engine.registry import register_method
from ..engine.tokens import gather_rows

STEPS = ("deit", "mae", "pitome", "bsm")
ENERGIES = ("official", "paper")


def merge_count(n: int, rate: float) -> int:
    """Patches PiToMe merges away in a block with ``n`` patches at keep ratio ``rate`` (official float)."""
    return math.floor(n - n * rate)


def energy_score(sim: Tensor, margin: float, alpha: float = 1.0, form: str = "official") -> Tensor:
    """[B, n]: each token's mean of ``f_m`` over its cosine similarities ``sim`` [B, n, n]."""
    if form == "official":
        f = F.elu(sim - margin, alpha=alpha)
    else:
        f = torch.where(sim >= margin, sim, alpha * torch.expm1(sim - margin))
    return f.mean(dim=-1)


def _pairwise(sim: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``sim[b, rows[b]][:, cols[b]]`` for each image b."""
    picked = gather_rows(sim, rows)
    return picked.gather(2, cols[:, None, :].expand(-1, rows.shape[1], -1))


@torch.no_grad()
def plan(
    metric: Tensor, r: int, margin: float, alpha: float, bsm: bool, form: str = "official"
) -> tuple[Tensor, Tensor, Tensor]:
    """Which patches stay and where the others go, from ``metric`` [B, n, C] (the patches' keys).

    Returns:
        ``kept`` [B, n - r]: patch indices of the output, in order; ``src`` [B, r]: the merged patches;
        ``dst`` [B, r]: the output position each of them merges into.
    """
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(1, 2)
    order = torch.argsort(energy_score(sim, margin, alpha, form), descending=True)
    if bsm:  # ToMe's matching on the energy-ordered split
        a, b = order[:, ::2], order[:, 1::2]
        best, best_b = _pairwise(sim, a, b).max(dim=-1)
        edge = best.argsort(dim=-1, descending=True)
        unm, src = edge[:, r:], edge[:, :r]
        rest, dst = a.gather(1, unm), best_b.gather(1, src)
        src = a.gather(1, src)
    else:  # every A patch of the 2r highest-energy ones merges into its best B
        a, b, rest = order[:, : 2 * r : 2], order[:, 1 : 2 * r : 2], order[:, 2 * r :]
        src, dst = a, _pairwise(sim, a, b).argmax(dim=-1)
    return torch.cat([rest, b], dim=1), src, dst + rest.shape[1]


def merge(tokens: Tokens, kept: Tensor, src: Tensor, dst: Tensor) -> Tokens:
    """Size-weighted merge of the patches ``src`` into output positions ``dst`` of ``kept``."""
    p = tokens.num_prefix
    size = tokens.size if tokens.size is not None else tokens.x.new_ones(*tokens.x.shape[:2], 1)

    def combine(t: Tensor, mode: str) -> Tensor:
        patches = t[:, p:]
        out = gather_rows(patches, kept)
        index = dst[..., None].expand(-1, -1, t.shape[-1])
        out = out.scatter_reduce(1, index, gather_rows(patches, src), reduce=mode)
        return torch.cat([t[:, :p], out], dim=1)

    new_size = combine(size, "sum")
    x = combine(tokens.x * size, "sum") / new_size
    source = None
    if tokens.source is not None:
        source = combine(tokens.source.to(x.dtype), "amax").bool()
    return Tokens(x, p, size=new_size, source=source)


@register_method(
    "pitome",
    kind="training-free",
    operation="merging",
    needs=("keys",),
    keep_rule="n - floor(n - n*K) per block, merging the highest-energy tokens",
    paper="Tran et al., PiToMe, NeurIPS 2024",
    reference="official PiToMe (hchautran/PiToMe)",
    order=18,
    colour="#9edae5",
)
class PiToMe(TokenReducer):
    def __init__(
        self,
        blocks: Sequence[int],
        rates: Sequence[float],
        margin: float = 0.75,
        alpha: float = 1.0,
        steps: str = "deit",
        energy: str = "official",
        prop_attn: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if steps not in STEPS:
            raise ReductionError(f"method.steps={steps!r} is not one of {list(STEPS)}")
        if energy not in ENERGIES:
            raise ReductionError(f"method.energy={energy!r} is not one of {list(ENERGIES)}")
        if len(blocks) != len(rates):
            raise ReductionError(f"method=pitome: {len(rates)} keep rates for blocks {list(blocks)}")
        low = [float(k) for k in rates if not 0.5 <= float(k) <= 1.0]
        if low:
            raise ReductionError(
                f"method=pitome merges at most half of a block's tokens (its matching pairs 2r of them): "
                f"keep rates {low} are outside [0.5, 1]; use keep_rate >= 0.5"
            )
        self.rates = {int(b): float(k) for b, k in zip(blocks, rates, strict=True)}
        self.margin, self.alpha = float(margin), float(alpha)
        self.steps, self.energy, self.prop_attn = steps, energy, prop_attn

    @classmethod
    def from_schedule(cls, schedule: str, blocks: list[int], rates: list[float], info, **options):
        """One keep ratio per block, of the current patch count (the official ``ratio``)."""
        return cls(blocks, rates, **options)

    def locations(self) -> list[Location]:
        return [Location(Site.INSIDE, b) for b in sorted(self.rates)]

    def block_margin(self, block: int) -> float:
        """``m_l``: the margin decreasing linearly with depth, as the official ``margins`` list."""
        return self.margin - self.margin * (block / self.info.depth)

    def bsm_step(self, block: int) -> bool:
        """Whether block ``block`` runs the BSM step (else the energy step)."""
        first_half = block < math.ceil(self.info.depth * 0.5)
        return {"deit": first_half, "mae": not first_half, "pitome": False, "bsm": True}[self.steps]

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each location (bound): ``n - floor(n - n*K)``, the kit's keep rule."""
        n, out = self.info.num_patches, {}
        for loc in self.locations():
            n = out[loc] = n - merge_count(n, self.rates[loc.block])
        return out

    def needs(self, block: int) -> AttentionNeeds:
        return AttentionNeeds(keys=block in self.rates)

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        r = merge_count(tokens.n, self.rates[loc.block])
        if r <= 0:
            return tokens
        metric = attn.keys.mean(dim=1)[:, tokens.num_prefix :]
        margin, bsm = self.block_margin(loc.block), self.bsm_step(loc.block)
        kept, src, dst = plan(metric, r, margin, self.alpha, bsm, self.energy)
        return merge(tokens, kept, src, dst)

    def extra_repr(self) -> str:
        return f"steps={self.steps}, margin={self.margin}, " + super().extra_repr()
