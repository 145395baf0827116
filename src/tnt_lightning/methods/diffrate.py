"""DiffRate (Chen et al., ICCV 2023): prune by CLS attention, then merge, inside every block.

Where: inside block l, after the attention residual and before the MLP (the official
``DiffRateBlock`` at inference), in every block of the backbone.

Per block, with ``p`` and ``m`` the block's kept numbers (patches, prefix tokens apart):

* the patches are sorted by the CLS query's attention averaged over heads (proportional attention
  included), most attended first;
* **prune**: the first ``min(p, n)`` stay, the rest are dropped;
* **merge**: of those, the first ``m`` are destinations; each of the others goes into its most
  cosine-similar destination, on the block's tokens ``x`` (not the keys). The official merge is a
  plain mean of the destination and its sources (``merge_mean="official"``; ``"size"``: ToMe's
  size-weighted mean), and a merged token's size grows by the source's size times that similarity
  (``size_update="similarity"``; ``"count"``: ToMe's plain sum). Later blocks add ``log(size)`` to
  their attention logits (``prop_attn``).

So ``n`` becomes ``min(n, p, m)`` in every block. The per-block ``p`` and ``m`` are a schedule:
released ones by name (:data:`RELEASED`, the official ``compression_rate.json``), explicit lists,
searched (``released="search"``: the official search as this method's training, ``task=train``, its
logits the cached artefact, ``keep_rate`` times the unpruned blocks' official GFLOPs its target), or
from ``keep_rate`` (the released schedule whose block cost is nearest K: :func:`released_for_rate`).
Deviation: a DIST token is a prefix token here (never ranked, pruned, merged or a destination;
the official code has no DIST token and would rank it as a patch). docs/methods/diffrate.md.

Cost: the merge's similarity product ``(p - m) * m * D`` per merging block; the CLS-attention row
is the attention's own, and the sort, gather and scatter are index work, free in the fvcore
convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import (
    AttentionInfo,
    AttentionNeeds,
    BackboneInfo,
    Location,
    ReductionError,
    Site,
    Tokens,
    analytic,
)
from ..engine.registry import register_method
from .common.learned import LearnedReducer, TrainingOutput, classification_loss

# method.released=search: the schedule is searched (task=train) rather than released.
SEARCH = "search"
MERGE_MEANS = ("official", "size")
SIZE_UPDATES = ("similarity", "count")
# A keep rate further than this from every candidate's keep-rate equivalent is refused rather than
# silently run at another cost.
MAX_RATE_GAP = 0.05


def _released(patches: int, prune: str, merge: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """One released schedule: the patch count it was searched for, and its per-block kept numbers
    as the official file writes them (tokens kept counting the CLS token)."""
    return patches, tuple(int(v) for v in prune.split(",")), tuple(int(v) for v in merge.split(","))


# The searched schedules published with the official code (OpenGVLab/DiffRate, compression_rate.json
# at commit 91ae3e3): per model and FLOPs target (GFLOPs in the official count), the tokens kept by
# the prune step and by the merge step of each block, CLS included. Published numbers, kept as data.
# (Its CAFormer-S36 entries are for a convolutional-attention model, not a ViT, and are left out.)
RELEASED: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "deit_t_0.6g": _released(
        196,
        "197,196,180,157,130,107,86,73,63,51,40,3",
        "197,187,167,139,114,90,76,66,57,45,37,3",
    ),
    "deit_t_0.7g": _released(
        196,
        "197,196,194,180,150,123,98,82,68,60,52,3",
        "197,196,192,158,133,103,88,72,64,58,49,3",
    ),
    "deit_t_0.8g": _released(
        196,
        "197,197,196,186,166,147,117,103,92,80,74,3",
        "197,196,190,172,154,125,107,96,84,78,70,3",
    ),
    "deit_t_0.9g": _released(
        196,
        "197,197,196,190,182,166,141,125,113,105,99,3",
        "197,196,194,188,172,147,129,115,107,103,96,3",
    ),
    "deit_t_1.0g": _released(
        196,
        "197,197,196,194,188,184,178,164,156,137,129,21",
        "197,197,196,190,186,154,148,156,145,135,125,21",
    ),
    "deit_s_2.3g": _released(
        196,
        "197,192,168,143,121,105,92,74,62,45,33,3",
        "197,180,156,127,109,98,80,66,52,37,31,3",
    ),
    "deit_s_2.5g": _released(
        196,
        "197,192,174,156,131,115,111,99,76,50,39,3",
        "197,186,160,133,119,107,96,82,66,43,37,3",
    ),
    "deit_s_2.7g": _released(
        196,
        "197,196,182,160,141,127,115,105,88,66,49,3",
        "197,188,170,147,131,119,109,96,76,54,45,3",
    ),
    "deit_s_2.9g": _released(
        196,
        "197,196,190,168,150,139,129,117,99,78,58,3",
        "197,194,176,156,141,133,121,107,88,64,56,3",
    ),
    "deit_s_3.1g": _released(
        196,
        "197,197,194,180,160,147,137,129,115,92,76,3",
        "197,196,186,164,150,141,133,121,103,78,68,3",
    ),
    "deit_b_8.7g": _released(
        196,
        "197,192,172,156,131,107,90,72,56,33,17,3",
        "197,178,162,141,115,96,78,60,47,21,13,3",
    ),
    "deit_b_10.0g": _released(
        196,
        "197,194,182,168,148,129,113,101,82,49,25,3",
        "197,186,174,156,137,117,105,90,66,31,19,3",
    ),
    "deit_b_10.4g": _released(
        196,
        "197,196,188,174,156,141,121,103,90,58,25,3",
        "197,190,184,164,145,131,107,94,74,31,21,3",
    ),
    "deit_b_11.5g": _released(
        196,
        "197,197,197,188,170,154,139,123,107,72,43,3",
        "197,197,192,178,158,145,127,111,94,50,35,3",
    ),
    "deit_b_12.5g": _released(
        196,
        "197,197,196,192,184,170,154,139,129,94,58,3",
        "197,196,194,190,176,160,145,131,115,68,47,3",
    ),
    "mae_b_8.7g": _released(
        196,
        "197,192,166,143,119,103,86,72,54,43,37,23",
        "197,176,150,127,107,92,76,58,47,41,23,23",
    ),
    "mae_b_10.0g": _released(
        196,
        "197,194,173,154,135,120,108,92,76,64,52,40",
        "197,181,160,141,122,116,95,80,67,60,40,40",
    ),
    "mae_b_10.4g": _released(
        196,
        "197,195,179,159,140,122,105,100,89,71,56,45",
        "197,187,166,145,125,109,102,97,75,64,45,45",
    ),
    "mae_b_11.5g": _released(
        196,
        "197,196,182,172,162,147,131,109,101,94,70,49",
        "197,192,178,164,150,133,115,101,96,82,49,49",
    ),
    "mae_l_31.0g": _released(
        196,
        "197,195,188,179,168,157,146,143,131,121,111,102,93,85,76,70,61,53,47,35,31,26,21,14",
        "197,191,184,172,161,151,145,135,125,117,106,96,89,80,72,64,54,50,40,27,27,23,14,14",
    ),
    "mae_l_34.7g": _released(
        196,
        "197,195,192,189,181,170,161,160,149,140,128,118,109,95,91,82,73,68,58,54,43,38,29,18",
        "197,193,190,185,173,164,159,154,142,137,121,111,103,97,82,76,67,61,58,48,35,32,18,18",
    ),
    "mae_l_38.5g": _released(
        196,
        "197,197,195,190,187,183,179,171,164,159,151,143,137,114,106,89,88,85,76,57,47,53,32,24",
        "197,196,193,189,183,180,175,167,161,158,152,134,120,110,97,91,87,83,65,47,54,34,24,24",
    ),
    "mae_l_42.3g": _released(
        196,
        "197,197,197,195,194,193,191,187,182,180,173,149,142,134,125,121,111,106,91,87,77,39,38,32",
        "197,197,196,194,193,192,187,183,181,173,154,146,137,127,123,114,105,98,87,75,43,45,32,32",
    ),
    "mae_l_46.1g": _released(
        196,
        "197,197,197,196,194,192,191,188,185,181,170,157,154,146,143,139,128,125,111,100,92,83,69,60",
        "197,197,196,195,193,191,189,187,183,176,162,155,148,145,139,133,127,118,104,95,86,71,60,60",
    ),
    "mae_h_83.7g": _released(
        256,
        "257,255,246,227,200,178,168,159,155,145,140,139,128,119,114,109,107,100,101,102,117,104,103,97,97,102,95,90,82,83,74,56",
        "257,252,240,212,186,172,160,163,148,142,138,132,118,114,111,108,103,102,105,106,109,105,108,99,96,96,95,86,79,77,56,56",
    ),
    "mae_h_93.2g": _released(
        256,
        "257,257,257,257,248,250,240,239,229,209,160,159,149,111,109,106,104,106,101,104,85,96,88,93,94,88,88,91,81,78,76,75",
        "257,257,257,249,242,241,239,229,209,203,159,150,124,107,107,101,100,101,104,89,101,88,89,88,91,86,86,83,78,78,75,75",
    ),
    "mae_h_103.4g": _released(
        256,
        "257,256,255,251,245,235,204,197,194,189,185,177,169,160,152,144,146,139,139,136,135,133,131,128,126,126,124,121,114,96,82,53",
        "257,256,253,247,238,211,201,195,193,185,179,171,162,154,150,145,141,138,137,135,134,133,130,127,125,125,122,114,101,90,53,53",
    ),
    "mae_h_124.5g": _released(
        256,
        "257,256,252,248,238,237,220,214,198,186,189,191,191,185,188,186,186,183,183,182,182,183,183,181,186,182,182,180,178,180,161,136",
        "257,254,251,244,238,223,221,203,194,192,191,190,188,184,188,185,184,183,185,183,183,185,183,183,185,183,179,167,177,133,136,136",
    ),
}
# The released schedules' models, by (depth, width, patches, pooled by the CLS token): a backbone
# of one of these shapes chooses among its own model's schedules.
FAMILIES = {
    (12, 192, 196, True): "deit_t",
    (12, 384, 196, True): "deit_s",
    (12, 768, 196, True): "deit_b",
    (12, 768, 196, False): "mae_b",
    (24, 1024, 196, False): "mae_l",
    (32, 1280, 256, False): "mae_h",
}


def patch_counts(name: str, num_patches: int) -> tuple[list[int], list[int]]:
    """Released schedule ``name`` as patches kept per block (the CLS token taken off), scaled to a
    backbone of ``num_patches`` patches by ``floor(k * num_patches / searched patches)``.

    Args:
        name: a key of :data:`RELEASED`.
        num_patches: the backbone's patch count (unchanged counts when it is the searched one).

    Returns:
        Prune and merge kept patches, one per block.
    """
    if name not in RELEASED:
        raise ReductionError(
            f"method.released={name!r} is not a released DiffRate schedule; choose one of {list(RELEASED)}"
        )
    searched, prune, merge = RELEASED[name]
    return [(k - 1) * num_patches // searched for k in prune], [
        (k - 1) * num_patches // searched for k in merge
    ]


def tokens_per_block(prune: Sequence[int], merge: Sequence[int], num_patches: int) -> list[tuple[int, int]]:
    """``(patches in, patches out)`` of each block: ``out = min(in, prune, merge)``."""
    n, out = num_patches, []
    for p, m in zip(prune, merge, strict=True):
        out.append((n, min(n, p, m)))
        n = out[-1][1]
    return out


def rate_equivalent(prune: Sequence[int], merge: Sequence[int], info: BackboneInfo) -> float:
    """A schedule's keep rate: its blocks' multiply-adds on ``info``'s backbone (attention on the
    tokens in, MLP on the tokens out, prefix included) over the unpruned blocks'."""
    p, dim, hidden = info.num_prefix, info.embed_dim, info.mlp_hidden

    def cost(n_in: int, n_out: int) -> int:
        return analytic.attn_part(p + n_in, dim) + analytic.mlp_part(p + n_out, dim, hidden)

    full = info.depth * cost(info.num_patches, info.num_patches)
    return sum(cost(a, b) for a, b in tokens_per_block(prune, merge, info.num_patches)) / full


def candidates(info: BackboneInfo) -> list[str]:
    """The released schedules a keep rate chooses among on ``info``'s backbone: its own model's
    when its shape is one of :data:`FAMILIES`, else those of its depth searched for a model pooled
    as it is (by the CLS token: DeiT's; by the mean: MAE's), else any of its depth."""
    by_token = info.global_pool == "token"
    family = FAMILIES.get((info.depth, info.embed_dim, info.num_patches, by_token))
    if family is not None:
        return [name for name in RELEASED if name.startswith(family + "_")]
    pooled = {name: key[3] for key, name in FAMILIES.items()}
    deep = [name for name, (_, prune, _) in RELEASED.items() if len(prune) == info.depth]
    alike = [name for name in deep if pooled[name.rsplit("_", 1)[0]] == by_token]
    return alike or deep


def released_for_rate(keep_rate: float, info: BackboneInfo) -> str:
    """The released schedule whose keep-rate equivalent (:func:`rate_equivalent`) is nearest
    ``keep_rate`` on ``info``'s backbone.

    Raises:
        ReductionError: no released schedule fits this depth, or none within
            :data:`MAX_RATE_GAP` of ``keep_rate`` (the message lists them with their rates).
    """
    names = candidates(info)
    if not names:
        depths = sorted({len(prune) for _, prune, _ in RELEASED.values()})
        raise ReductionError(
            f"method=diffrate: the released schedules are for {depths}-block ViTs, this backbone has "
            f"{info.depth} blocks; give method.prune_kept and method.merge_kept (one per block)"
        )
    rates = {name: rate_equivalent(*patch_counts(name, info.num_patches), info) for name in names}
    best = min(names, key=lambda name: abs(rates[name] - keep_rate))
    if abs(rates[best] - keep_rate) > MAX_RATE_GAP:
        listed = ", ".join(f"{name} ({rate:.2f})" for name, rate in rates.items())
        raise ReductionError(
            f"method=diffrate: no released schedule runs near keep_rate={keep_rate} on this backbone "
            f"(keep-rate equivalents: {listed}); choose a keep_rate within {MAX_RATE_GAP} of one, "
            f"method.released=<name>, or method.prune_kept/merge_kept"
        )
    return best


class _CeilStraightThrough(torch.autograd.Function):
    """``ceil`` forward, the identity backward (the official ``STE_Ceil``)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.ceil(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _MinStraightThrough(torch.autograd.Function):
    """The least of a token count and two kept numbers; backward, the whole gradient to both kept
    numbers, whichever is least, and none to the count (the official ``STE_Min``)."""

    @staticmethod
    def forward(ctx, count: Tensor, prune: Tensor, merge: Tensor) -> Tensor:
        return torch.minimum(torch.minimum(count, prune), merge)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, Tensor]:
        return None, grad, grad


@register_method(
    "diffrate",
    kind="learned",
    operation="pruning+merging",
    needs=("cls_token", "cls_attention"),
    keep_rule="min(n, p_l, m_l) per block (released or searched schedule)",
    paper="Chen et al., DiffRate, ICCV 2023",
    reference="official DiffRate (OpenGVLab/DiffRate)",
    order=19,
    colour="#637939",
    train_overrides=(f"method.released={SEARCH}",),
)
class DiffRate(LearnedReducer):
    def __init__(
        self,
        prune_kept: Sequence[int],
        merge_kept: Sequence[int],
        released: str | None = None,
        prop_attn: bool = True,
        merge_mean: str = "official",
        size_update: str = "similarity",
        chosen_by: float | None = None,
        granularity: int = 4,
        flops_weight: float = 5.0,
        seed: int = 0,
    ) -> None:
        """Args:
        prune_kept: patches kept by each block's prune step (prefix tokens apart), one per block;
            for ``released="search"`` the patch count in every block (the search's candidates).
        merge_kept: patches kept by each block's merge step, one per block.
        released: the released schedule these counts come from, for the record (None: given), or
            ``"search"``: the counts come from this method's trained search parameters.
        prop_attn: add ``log(size)`` to later blocks' attention logits (official).
        merge_mean: ``official`` (plain mean of a destination and its sources) or ``size``.
        size_update: ``similarity`` (official: sources' sizes times their similarity) or ``count``.
        chosen_by: the keep rate that chose ``released``, or the search's target (None: named or given).
        granularity: the search's step between candidate kept numbers (official default 4).
        flops_weight: the search loss's weight of ``(GFLOPs - target)^2`` (official 5).
        seed: unused (no random draws); kept for the common signature.
        """
        super().__init__(seed=seed)
        if merge_mean not in MERGE_MEANS:
            raise ReductionError(f"method.merge_mean={merge_mean!r} is not one of {list(MERGE_MEANS)}")
        if size_update not in SIZE_UPDATES:
            raise ReductionError(f"method.size_update={size_update!r} is not one of {list(SIZE_UPDATES)}")
        if len(prune_kept) != len(merge_kept) or any(int(v) < 0 for v in (*prune_kept, *merge_kept)):
            raise ReductionError(
                f"method=diffrate: prune_kept={list(prune_kept)} and merge_kept={list(merge_kept)} must be "
                f"counts >= 0, one of each per block"
            )
        self.prune_kept = [int(v) for v in prune_kept]
        self.merge_kept = [int(v) for v in merge_kept]
        self.released = released
        self.chosen_by = chosen_by
        self.prop_attn = prop_attn
        self.merge_mean = merge_mean
        self.size_update = size_update
        self.granularity = int(granularity)
        self.flops_weight = float(flops_weight)
        # The search: per block, logits over its candidate kept numbers (the official DDP's
        # selected_probability, zeros at the start), for the prune and for the merge step.
        self.prune_logits = nn.ParameterList()
        self.merge_logits = nn.ParameterList()
        if released == SEARCH:
            for block in range(len(self.prune_kept)):
                self.prune_logits.append(nn.Parameter(torch.zeros(len(self.candidates(block)))))
                self.merge_logits.append(nn.Parameter(torch.zeros(len(self.candidates(block)))))
        # (prune, merge) kept numbers of every block of the last search forward, for its FLOPs.
        self._searched: list[tuple[Tensor, Tensor]] = []

    @classmethod
    def from_schedule(
        cls,
        schedule: str,
        blocks: list[int],
        rates: list[float],
        info: BackboneInfo,
        released: str | None = None,
        prune_kept: Sequence[int] | None = None,
        merge_kept: Sequence[int] | None = None,
        **options: Any,
    ):
        """Explicit kept numbers (counting the CLS token, as the official file), else the released
        schedule ``released`` or the search (``released=search``, the keep rate its target), else
        the released one nearest the keep rate. ``schedule`` and ``blocks`` do not matter: DiffRate
        acts in every block."""
        if (prune_kept is None) != (merge_kept is None):
            raise ReductionError(
                "method=diffrate: give both method.prune_kept and method.merge_kept, or neither"
            )
        if prune_kept is not None:
            counts = [int(v) - 1 for v in prune_kept], [int(v) - 1 for v in merge_kept]
            return cls(*counts, released=None, **options)
        if released == SEARCH:
            full = [info.num_patches] * info.depth
            return cls(full, full, released=SEARCH, chosen_by=rates[0], **options)
        if released is not None:
            return cls(*patch_counts(released, info.num_patches), released=released, **options)
        name = released_for_rate(rates[0], info)
        return cls(*patch_counts(name, info.num_patches), released=name, chosen_by=rates[0], **options)

    def resolved_schedule(self) -> dict[str, Any]:
        """Every block, the released schedule's name and its kept numbers counting the CLS token
        (a search's are known once trained); the keep rate at every block when it chose the
        schedule or is the search's target, else no rates."""
        depth = len(self.prune_kept)
        record = {
            "blocks": list(range(depth)),
            "rates": None if self.chosen_by is None else [self.chosen_by] * depth,
            "released": self.released,
        }
        if self.released == SEARCH:
            return record
        prune, merge = self.kept_numbers()
        return {**record, "prune_kept": [k + 1 for k in prune], "merge_kept": [k + 1 for k in merge]}

    def bind(self, info: BackboneInfo) -> None:
        if len(self.prune_kept) != info.depth:
            given = f"schedule {self.released} has" if self.released else "method.prune_kept/merge_kept have"
            raise ReductionError(
                f"method=diffrate: {given} {len(self.prune_kept)} blocks, this backbone {info.depth}; "
                f"give one kept number per block"
            )
        super().bind(info)

    # -- the schedule ----------------------------------------------------------------------------

    def kept_numbers(self) -> tuple[list[int], list[int]]:
        """Prune and merge kept patches per block: given, released, or from the search's parameters."""
        if self.released != SEARCH:
            return self.prune_kept, self.merge_kept
        with torch.no_grad():
            return tuple(
                [int(self.expected_kept(logits, block)) - 1 for block, logits in enumerate(params)]
                for params in (self.prune_logits, self.merge_logits)
            )

    def _steps(self) -> list[tuple[int, int, int]]:
        """``(block, patches in, patches out)`` of the blocks that remove tokens (bound)."""
        flow = tokens_per_block(*self.kept_numbers(), self.info.num_patches)
        return [(b, n_in, n_out) for b, (n_in, n_out) in enumerate(flow) if n_out < n_in]

    def locations(self) -> list[Location]:
        if self.info is None:  # before binding: every block the schedule names
            return [Location(Site.INSIDE, b) for b in range(len(self.prune_kept))]
        if self.training and self.released == SEARCH:  # the search masks in every block
            return [Location(Site.PRE), *(Location(Site.INSIDE, b) for b in range(self.info.depth))]
        return [Location(Site.INSIDE, b) for b, _, _ in self._steps()]

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each location (bound, eval): ``min(n, p_l, m_l)``, the kit's keep rule."""
        return {Location(Site.INSIDE, b): n_out for b, _, n_out in self._steps()}

    def needs(self, block: int) -> AttentionNeeds:
        if self.training and self.released == SEARCH:
            return AttentionNeeds(cls_probs=True)
        active = any(b == block for b, _, _ in self._steps())
        return AttentionNeeds(cls_probs=active)

    # -- inference ---------------------------------------------------------------------------------

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        if self.training and self.released == SEARCH:
            return (
                self.search_start(tokens)
                if loc.site is Site.PRE
                else self.search_step(loc.block, tokens, attn)
            )
        prune, merge = self.kept_numbers()
        kept = min(tokens.n, prune[loc.block])
        merged = min(kept, merge[loc.block])
        if merged == tokens.n:
            return tokens
        score = attn.cls_probs[:, :, 0, tokens.num_prefix :].mean(dim=1)
        order = score.argsort(dim=1, descending=True)[:, :kept]
        tokens = tokens.keep(order)
        return tokens if merged == kept else self.merge(tokens, merged)

    def merge(self, tokens: Tokens, merged: int) -> Tokens:
        """Merge every patch after the first ``merged`` into its most cosine-similar one of them."""
        p = tokens.num_prefix
        with torch.no_grad():
            metric = F.normalize(tokens.patches, dim=-1)
            similarity = metric[:, merged:] @ metric[:, :merged].transpose(1, 2)
            best, dst = similarity.max(dim=-1)
        size = tokens.size if tokens.size is not None else tokens.x.new_ones(*tokens.x.shape[:2], 1)
        src_size = size[:, p + merged :]
        if self.size_update == "similarity":
            src_size = src_size * best[..., None]

        def combine(t: Tensor, src: Tensor, mode: str, include_self: bool = True) -> Tensor:
            index = dst[..., None].expand(-1, -1, t.shape[-1])
            kept = t[:, p : p + merged].scatter_reduce(1, index, src, reduce=mode, include_self=include_self)
            return torch.cat([t[:, :p], kept], dim=1)

        if self.merge_mean == "official":
            x = combine(tokens.x, tokens.x[:, p + merged :], "mean")
        else:
            x = combine(tokens.x * size, tokens.x[:, p + merged :] * size[:, p + merged :], "sum")
            x = x / combine(size, size[:, p + merged :], "sum")
        new_size = combine(size, src_size, "sum")
        source = None
        if tokens.source is not None:
            traced = tokens.source.to(x.dtype)
            source = combine(traced, traced[:, p + merged :], "amax").bool()
        return Tokens(x, p, size=new_size, source=source)

    # -- the search (training) ---------------------------------------------------------------------

    def needs_training(self) -> bool:
        """Only a search trains; a released or given schedule runs as it is."""
        return self.released == SEARCH

    def candidates(self, block: int, like: Tensor | None = None) -> Tensor:
        """The kept patch counts block ``block``'s search chooses among: n0, n0 - granularity, ...
        down to 1 or more; block 0 only n0 (the official DDP's ``kept_token_candidate``)."""
        n0 = max(self.prune_kept)
        step = n0 + 1 if block == 0 else self.granularity
        dtype = torch.float32 if like is None else like.dtype
        return torch.arange(n0, 0, -step, dtype=dtype, device=None if like is None else like.device)

    def expected_kept(self, logits: Tensor, block: int) -> Tensor:
        """The kept number (counting the CLS token) of a block's search: the expected candidate
        under ``softmax(logits)``, rounded up straight-through, plus one."""
        return _CeilStraightThrough.apply(self.candidates(block, logits) @ logits.softmax(dim=-1)) + 1

    def token_mask(self, logits: Tensor, block: int, kept: int, upto: int) -> Tensor:
        """[1 + n0] over the CLS token and the sorted patches: 0 from ``kept`` to ``upto``, 1
        elsewhere, with the gradient of the probability that each position is kept (straight
        through; the official ``get_token_mask``, its loop included, so that it rounds alike)."""
        probs = logits.softmax(dim=-1)
        keep = logits.new_zeros(max(self.prune_kept) + 1)
        for candidate, prob in zip(self.candidates(block, logits), probs, strict=True):
            keep[: int(candidate + 1)] += prob
        mask = torch.ones_like(keep)
        mask[kept:upto] = 0
        return mask - keep.detach() + keep

    def search_start(self, tokens: Tokens) -> Tokens:
        """Every token kept (policy 1) and of size 1 before block 0."""
        self._searched = []
        ones = tokens.x.new_ones(*tokens.x.shape[:2], 1)
        return Tokens(tokens.x, tokens.num_prefix, size=ones, policy=ones)

    def search_step(self, block: int, tokens: Tokens, attn: AttentionInfo) -> Tokens:
        """The official training step of a block: sort by CLS attention, mask the pruned tokens,
        merge the next ones (kept in place, masked) into their most similar kept ones."""
        p = tokens.num_prefix
        score = attn.cls_probs[:, :, 0, p:].mean(dim=1)
        tokens = tokens.keep(score.argsort(dim=1, descending=True))
        policy = tokens.policy[..., 0]
        mask = torch.cat([policy[:, :1], policy[:, p:]], dim=1)  # the official mask: CLS, patches
        last = int(mask[0].sum())
        prune = self.expected_kept(self.prune_logits[block], block)
        merge = self.expected_kept(self.merge_logits[block], block)
        self._searched.append((prune, merge))
        if prune < last:
            mask = mask * self.token_mask(self.prune_logits[block], block, int(prune), last)
        mid = min(last, int(prune))
        if merge < mid:
            tokens = self.search_merge(tokens, int(merge) - 1, mid - 1)
            mask = mask * self.token_mask(self.merge_logits[block], block, int(merge), mid)
        policy = torch.cat([mask[:, :1].expand(-1, p), mask[:, 1:]], dim=1)  # a DIST token as the CLS
        return Tokens(tokens.x, p, size=tokens.size, policy=policy[..., None])

    @staticmethod
    def search_merge(tokens: Tokens, merged: int, upto: int) -> Tokens:
        """Patches ``merged`` to ``upto`` merged into their most similar of the first ``merged`` by a
        plain mean, and kept in place (to be masked); sizes scaled by similarity, at least 1."""
        p = tokens.num_prefix
        patches, sizes = tokens.patches, tokens.patch_sizes()
        with torch.no_grad():
            metric = F.normalize(patches[:, :upto], dim=-1)
            best, dst = (metric[:, merged:] @ metric[:, :merged].transpose(1, 2)).max(dim=-1)
        index = dst[..., None]
        x = patches[:, :merged].scatter_reduce(
            1, index.expand(-1, -1, patches.shape[-1]), patches[:, merged:upto], reduce="mean"
        )
        size = torch.cat([sizes[:, :merged], sizes[:, merged:upto] * best[..., None]], dim=1).clamp(1)
        size_kept = size[:, :merged].scatter_reduce(1, index, size[:, merged:], reduce="sum")
        x = torch.cat([tokens.prefix, x, patches[:, merged:]], dim=1)
        size = torch.cat([tokens.size[:, :p], size_kept, size[:, merged:], sizes[:, upto:]], dim=1)
        return Tokens(x, p, size=size, policy=tokens.policy)

    def block_flops(self, count: Tensor | float, after: Tensor | float) -> Tensor | float:
        """The official count of a block whose attention runs on ``count`` tokens and its MLP on
        ``after``: no LayerNorm, ``4 N C^2 + 2 N^2 C`` and ``2 N C M``."""
        c, hidden = self.info.embed_dim, self.info.mlp_hidden
        return 4 * count * c * c + 2 * count * count * c + 2 * after * c * hidden

    def search_flops(self) -> Tensor:
        """The blocks' multiply-adds at the last search forward's kept numbers (the official
        ``calculate_flop_training``, blocks only), differentiable in them."""
        extra = self.info.num_prefix - 1  # tokens besides the CLS token the kept numbers count
        count = self.prune_logits[0].new_tensor(float(self.info.num_patches + 1 + extra))
        flops = 0.0
        for prune, merge in self._searched:
            attention = count
            count = _MinStraightThrough.apply(count, prune + extra, merge + extra)
            flops = flops + self.block_flops(attention, count)
        return flops

    def training_key(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "target": self.chosen_by,
            "granularity": self.granularity,
            "flops_weight": self.flops_weight,
            "prop_attn": self.prop_attn,
        }

    def training_loss(
        self,
        model: nn.Module,
        x: Tensor,
        targets: Tensor,
        label_smoothing: float,
        teacher: nn.Module | None = None,
    ) -> TrainingOutput:
        """The official search loss: classification plus ``flops_weight * (GFLOPs - target)^2``,
        the target being ``keep_rate`` times the unpruned blocks' GFLOPs (official count)."""
        logits = model.forward_head(model.forward_features(x))
        cls_loss = classification_loss(logits, targets, label_smoothing)
        n = self.info.num_patches + self.info.num_prefix
        target = self.chosen_by * self.info.depth * self.block_flops(n, n) / 1e9
        gflops = self.search_flops() / 1e9
        flops_loss = (gflops - target) ** 2
        stats = {"cls_loss": cls_loss.detach(), "flops_loss": flops_loss.detach(), "gflops": gflops.detach()}
        return TrainingOutput(cls_loss + self.flops_weight * flops_loss, logits.detach(), stats)

    def extra_repr(self) -> str:
        return f"released={self.released}, " + super().extra_repr()
