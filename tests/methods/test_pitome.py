"""PiToMe: the energy score, both merging steps, the counts, and where it is ToMe.

What the float64 comparison with the official code (hchautran/PiToMe) showed, kept without it: the
energy (mean of ``elu(cos - m_l)`` over all patches) ranks an isolated patch below a cluster, so the
cluster merges and the isolated patch stays; the energy step merges every A patch of the 2r
highest-energy ones into its best B, the BSM step is ToMe's matching on the energy-ordered split;
``r = floor(n - n*K)`` in every block; the output order is the official one.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tnt_lightning as tl
from helpers import tiny_vit
from tnt_lightning.engine import AttentionInfo, Location, ReductionError, Site, Tokens, apply_reducer
from tnt_lightning.engine.patch import backbone_info
from tnt_lightning.methods import pitome
from tnt_lightning.methods.pitome import PiToMe, energy_score, merge_count, plan
from tnt_lightning.methods.tome import ToMe

INSIDE = Location(Site.INSIDE, 0)
ISOLATED = [2, 5]  # patches of the hand-made image pointing away from the cluster


def hand_made(n: int = 8, dim: int = 4, prefix: int = 1):
    """One image: every patch's key is e1 (plus a little noise) but patches 2 and 5, which point
    along e2 and e3; random features."""
    g = torch.Generator().manual_seed(0)
    keys = torch.zeros(1, 1, prefix + n, dim, dtype=torch.float64)
    keys[..., 0] = 1.0
    keys += 0.05 * torch.randn(keys.shape, generator=g, dtype=torch.float64)
    for i, axis in zip(ISOLATED, (1, 2), strict=True):
        if i < n:
            keys[0, 0, prefix + i] = torch.eye(dim, dtype=torch.float64)[axis]
    x = torch.randn(1, prefix + n, 6, generator=g, dtype=torch.float64)
    return Tokens(x, prefix), AttentionInfo(keys=keys)


def bound(method: PiToMe, depth: int = 12) -> PiToMe:
    method.bind(backbone_info(tiny_vit(depth=depth)))
    return method


def test_energy_is_the_mean_elu_of_the_cosines_minus_the_margin_or_the_papers_form():
    sim = torch.tensor([[[1.0, 0.8, 0.1], [0.8, 1.0, 0.3], [0.1, 0.3, 1.0]]], dtype=torch.float64)
    elu = lambda v: v if v >= 0 else math.expm1(v)  # noqa: E731
    official = [sum(elu(c - 0.5) for c in row) / 3 for row in sim[0].tolist()]
    torch.testing.assert_close(energy_score(sim, 0.5), torch.tensor([official], dtype=torch.float64))
    paper = [sum(c if c >= 0.5 else 2 * math.expm1(c - 0.5) for c in row) / 3 for row in sim[0].tolist()]
    paper = torch.tensor([paper], dtype=torch.float64)
    torch.testing.assert_close(energy_score(sim, 0.5, 2.0, "paper"), paper)


@pytest.mark.parametrize("steps", ["pitome", "bsm"])
def test_the_isolated_patches_are_kept_and_the_cluster_merges(steps):
    tokens, attn = hand_made()
    method = bound(PiToMe([0], [0.75], steps=steps))
    metric = torch.nn.functional.normalize(attn.keys[0, 0, 1:], dim=-1)[None]
    energy = energy_score(metric @ metric.transpose(1, 2), method.block_margin(0))
    assert set(energy.argsort(dim=1)[0, :2].tolist()) == set(ISOLATED)  # the two lowest energies
    tokens = Tokens(tokens.x, 1, source=torch.eye(9, dtype=torch.bool)[None])
    out = method.reduce(INSIDE, tokens, attn)
    assert out.n == 8 - merge_count(8, 0.75) == 6
    groups = [set((row.nonzero()[:, 0] - 1).tolist()) for row in out.source[0, 1:]]
    assert {2} in groups and {5} in groups  # the isolated patches alone
    for group, x, size in zip(groups, out.patches[0], out.patch_sizes()[0], strict=True):
        assert len(group) == size  # every token a mean of the patches it stands for
        torch.testing.assert_close(x, tokens.patches[0, sorted(group)].mean(dim=0))
    assert out.patch_sizes().sum() == 8
    torch.testing.assert_close(out.prefix, tokens.prefix)


def test_the_energy_step_merges_every_a_of_the_2r_highest_into_its_best_b_in_the_official_order():
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 10, 5, generator=g, dtype=torch.float64)
    kept, src, dst = plan(metric, 3, 0.5, 1.0, bsm=False)
    unit = torch.nn.functional.normalize(metric, dim=-1)
    sim = unit @ unit.transpose(1, 2)
    order = energy_score(sim, 0.5).argsort(dim=1, descending=True)
    for b in range(2):
        a, bb, rest = order[b, 0:6:2], order[b, 1:6:2], order[b, 6:]
        assert kept[b].tolist() == rest.tolist() + bb.tolist()  # protected by energy, then B
        assert src[b].tolist() == a.tolist()
        assert dst[b].tolist() == (4 + sim[b][a][:, bb].argmax(dim=1)).tolist()


def test_the_bsm_step_is_tomes_matching_on_the_energy_ordered_split(monkeypatch):
    """With the energies falling along the positions, the split is ToMe's: a mean-pooled model
    (no prefix token, so ToMe's split is the patches') then equals ToMe at the same counts."""
    falling = lambda sim, *a: -torch.arange(sim.shape[-1]).to(sim).expand(sim.shape[:2])  # noqa: E731
    monkeypatch.setattr(pitome, "energy_score", falling)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        bsm = PiToMe([1, 2], [0.75, 0.75], steps="bsm", prop_attn=True)
        ours = apply_reducer(tiny_vit(prefix=0).double(), bsm)
        tome = apply_reducer(tiny_vit(prefix=0).double(), ToMe([1, 2], [4, 3]))
        torch.testing.assert_close(ours.eval()(x), tome.eval()(x))
    torch.testing.assert_close(ours.last_tokens.size, tome.last_tokens.size)


def test_deit_s_counts_are_floor_n_minus_n_k_of_the_current_count_in_every_block():
    info = backbone_info(tiny_vit(img=224, patch=16, depth=12))
    counts = {}
    for rate in (0.9, 0.9125, 0.5):
        method = PiToMe.from_schedule("multi", list(range(12)), [rate] * 12, info)
        method.bind(info)
        counts[rate] = list(method.expected_tokens().values())
    # the official code's counts (deit_small, float64 comparison), not ToMe's n - int(n*K) (176 at 0.9)
    assert counts[0.9] == [177, 160, 144, 130, 117, 106, 96, 87, 79, 72, 65, 59]
    assert counts[0.9125] == [179, 164, 150, 137, 126, 115, 105, 96, 88, 81, 74, 68]
    assert counts[0.5] == [98, 49, 25, 13, 7, 4, 2, 1, 1, 1, 1, 1]  # r = 0 from n = 1 on
    with pytest.raises(ReductionError, match="at most half"):
        PiToMe.from_schedule("single", [2], [0.4], info)


def test_a_block_with_nothing_to_merge_is_left_unchanged():
    tokens, attn = hand_made(n=1)
    assert bound(PiToMe([0], [0.5])).reduce(INSIDE, tokens, attn) is tokens


def test_margins_fall_with_depth_and_the_deit_split_runs_bsm_in_the_first_half():
    method = bound(PiToMe(list(range(12)), [0.9] * 12))
    assert [method.block_margin(b) for b in range(12)] == [0.75 - 0.75 * (b / 12) for b in range(12)]
    assert [method.bsm_step(b) for b in range(12)] == [True] * 6 + [False] * 6
    mae = bound(PiToMe(list(range(12)), [0.9] * 12, steps="mae"))
    assert [mae.bsm_step(b) for b in range(12)] == [False] * 6 + [True] * 6


def test_dist_is_a_prefix_token_and_sizes_sum_to_the_patches():
    model = apply_reducer(tiny_vit(prefix=2), PiToMe([0, 1, 2, 3], [0.7] * 4), trace_sources=True).eval()
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    tokens = model.last_tokens
    assert tokens.n == 16 - 4 - 3 - 2 - 2  # floor(n - 0.7 n) of 16, 12, 9, 7
    assert tokens.patch_sizes().sum(dim=1).eq(16).all()
    eye = torch.eye(18, dtype=torch.bool)[:2]
    assert torch.equal(tokens.source[:, :2], eye.expand(3, -1, -1))  # CLS and DIST: themselves only
    assert not tokens.source[:, 2:, :2].any()
    stands_for = tokens.source[:, 2:].sum(dim=-1, keepdim=True)
    torch.testing.assert_close(stands_for.to(tokens.size), tokens.size[:, 2:])


def test_its_own_cost_is_the_n_by_n_similarity_of_the_head_averaged_keys():
    tokens, _ = hand_made(n=10)
    keys = torch.randn(2, 3, 11, 4, dtype=torch.float64)
    tokens = Tokens(tokens.x.expand(2, -1, -1), 1)
    with FlopCounterMode(display=False) as counter:
        bound(PiToMe([0], [0.8])).reduce(INSIDE, tokens, AttentionInfo(keys=keys))
    assert counter.get_total_flops() == 2 * (2 * 10 * 10 * 4)  # B * n * n * D/H multiply-adds


def test_the_method_config_carries_the_official_defaults():
    model = tl.prune(tiny_vit(img=224, patch=16, depth=12), "pitome", keep_rate=0.9, schedule="multi")
    method = model.reducer
    assert isinstance(method, PiToMe) and sorted(method.rates) == list(range(12))
    assert (method.margin, method.alpha, method.steps, method.energy, method.prop_attn) == (
        0.75,
        1.0,
        "deit",
        "official",
        False,
    )
    assert list(method.expected_tokens().values())[-1] == 59
