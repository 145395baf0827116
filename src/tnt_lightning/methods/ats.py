"""ATS, Adaptive Token Sampling (Fayyaz et al., ECCV 2022), as in Haurum et al.'s training-free form.

Inside block l, after the attention residual (so block l's MLP already runs on the sampled
tokens), with block l's attention probabilities A and values V:

* significance ``s_j = sum_h A[h, CLS, j] * ||V[h, j]||`` over the non-prefix tokens j, normalised
  to sum to 1 (``/ (sum + 1e-6)``), and its cumulative distribution F;
* ``S`` sample points: Haurum's ``arange(1/(2K), (2K-1)/(2K), 1/K)`` with ``K = int(n0 * rho_j) + 1``,
  i.e. ``S = int(n0 * rho_j)`` points (2i+1)/(2K); each picks the token whose F is nearest to it
  (inverse-transform sampling; the first token on a tie);
* duplicates are removed: the sampled tokens, in their current order, are kept. So an image
  keeps at most S tokens (fewer when its significance is concentrated), the prefix always.

**Variable counts.** Images of a batch keep different numbers of tokens. The batch is padded to
its largest count with placeholder tokens of size 0: every later attention adds ``log(size)`` to
its logits (``prop_attn``), so a placeholder gets exactly zero weight as a key, and mean pooling
weighs tokens by size, so it never reaches the output. Placeholders cost compute (throughput
counts them); a batch of one has none. GFLOPs are counted at batch 1 per image and averaged over
``measure.gflops_images`` held-out images (random inputs in a cost-only run); each follows its
image's kept count (at most the S-sample count; ``bound_tokens`` gives it).
Deviation: Haurum's multi-stage code can sample a padding token of an earlier stage back into a
batch; here placeholders are never candidates (identical at batch 1).

Cost: nothing beyond the block (the cumulative sums and the 1-D nearest search are element-wise).
Unlike ATS's own code, block l's A.V and projection still run on all tokens (the engine samples
after the attention residual; the values are the same): n x (N + D) x D more multiply-adds there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..engine import AttentionInfo, AttentionNeeds, Location, Site, Tokens
from ..engine.registry import register_method
from .common.absolute import AbsoluteStages


def sample_points(count: int) -> Tensor:
    """Haurum's points for ``count`` = int(n0 * rho): ``arange(1/(2K), (2K-1)/(2K), 1/K)``, K = count + 1.

    That is ``count`` points, or ``count + 1`` where float rounding keeps the end point (count 2, 6, 11...).
    """
    k = count + 1
    return torch.arange(1 / (2 * k), (2 * k - 1) / (2 * k), 2 / (2 * k))


def significance(attn: AttentionInfo, num_prefix: int, eps: float = 1e-6) -> Tensor:
    """[B, n]: CLS attention times value norms, summed over heads, normalised to sum to 1."""
    score = (attn.cls_probs[:, :, 0, num_prefix:] * attn.values[:, :, num_prefix:].norm(dim=-1)).sum(dim=1)
    return score / (score.sum(dim=-1, keepdim=True) + eps)


def inverse_transform_sample(score: Tensor, points: Tensor, valid: Tensor | None = None) -> Tensor:
    """[B, S] index of the token whose cumulative score is nearest to each point (``valid``: candidates)."""
    cdf = score.cumsum(dim=-1)
    gap = (points.to(cdf)[None, :, None] - cdf[:, None, :]).abs()  # [B, S, n]
    if valid is not None:
        gap = gap.masked_fill(~valid[:, None, :], torch.inf)
    return gap.argmin(dim=-1)


def unique_padded(samples: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Per row, the distinct sampled indices in increasing order, padded to the longest row.

    Returns indices [B, M] (padding repeats the row's first index) and a [B, M] mask of the real ones.
    """
    chosen = torch.zeros(samples.shape[0], n, dtype=torch.bool, device=samples.device)
    chosen.scatter_(1, samples, True)
    counts = chosen.sum(dim=1)
    longest = int(counts.max())
    order = torch.arange(n, device=samples.device).expand_as(chosen)
    ranked = torch.where(chosen, order, n).sort(dim=1).values[:, :longest]  # chosen first, in order
    real = torch.arange(longest, device=samples.device)[None, :] < counts[:, None]
    return torch.where(real, ranked, ranked[:, :1]), real


@register_method(
    "ats",
    kind="training-free",
    operation="pruning",
    needs=("cls_token", "cls_attention", "values"),
    keep_rule="at most int(n0*rho^j), fewer when samples coincide",
    paper="Fayyaz et al., ATS, ECCV 2022, training-free as in Haurum et al. 2023",
    reference="Haurum et al.'s TokenReduction code",
    order=13,
    colour="#98df8a",
)
class ATS(AbsoluteStages):
    site = Site.INSIDE
    prop_attn = True  # placeholders (size 0) get no attention
    image_dependent_cost = True

    def __init__(self, blocks: Sequence[int], ratios: Sequence[float], seed: int = 0) -> None:
        super().__init__(blocks, ratios, seed=seed)

    def needs(self, block: int) -> AttentionNeeds:
        active = block in self.blocks
        return AttentionNeeds(cls_probs=active, values=active)

    def bound_tokens(self) -> list[int]:
        """The most non-prefix tokens each stage can keep (every sample distinct)."""
        return [len(sample_points(c)) for c in self.counts]

    def expected_tokens(self) -> dict[Location, int]:
        """At most :meth:`bound_tokens` per stage: the count depends on the image."""
        return dict(zip(self.locations(), self.bound_tokens(), strict=True))

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        p = tokens.num_prefix
        points = sample_points(self.counts[self.stage(loc)])
        valid = None if tokens.size is None else tokens.size[:, p:, 0] > 0
        samples = inverse_transform_sample(significance(attn, p), points.to(tokens.x.device), valid)
        idx, real = unique_padded(samples, tokens.n)
        kept = tokens.keep(idx)
        if bool(real.all()):
            return kept
        size = torch.cat([kept.x.new_ones(kept.x.shape[0], p), real.to(kept.x.dtype)], dim=1)[..., None]
        source = kept.source
        if source is not None:
            source = source & torch.cat([torch.ones_like(real[:, :p]), real], dim=1)[..., None]
        return Tokens(kept.x, p, size=size, source=source)
