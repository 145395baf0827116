"""PPT: the variance rule, the significance, the counts, and the batch that mixes both operations.

What the float64 comparison with the official code (xjwu1024/PPT) showed, kept without it: an
image pools (ToMe's matching) when the variance of its normalised significance is below the
threshold and prunes otherwise; both remove ``min(r, n // 2)`` tokens; pruning keeps the rest in
descending significance; each image of a mixed batch gets what it would get alone.
"""

from __future__ import annotations

import math

import pytest
import torch

import tnt_lightning as tl
from helpers import tiny_vit
from tnt_lightning.engine import AttentionInfo, Location, ReductionError, Site, Tokens, apply_reducer
from tnt_lightning.engine.patch import backbone_info
from tnt_lightning.methods.ppt import PPT, significance
from tnt_lightning.methods.tome import ToMe

INSIDE = Location(Site.INSIDE, 0)


def hand_made(n: int = 8, heads: int = 2, dim: int = 4):
    """Two images of 1 + n tokens: image 0's CLS attends to every patch equally and every value has
    the same norm (variance 0); image 1's CLS attends to patch j in proportion to j + 1."""
    torch.manual_seed(0)
    x = torch.randn(2, 1 + n, dim * heads, dtype=torch.float64)
    cls = torch.full((2, heads, 1, 1 + n), 1.0 / (1 + n), dtype=torch.float64)
    ramp = torch.arange(1, n + 2, dtype=torch.float64)
    cls[1] = ramp / ramp.sum()
    values = torch.ones(2, heads, 1 + n, dim, dtype=torch.float64)
    keys = torch.randn(2, heads, 1 + n, dim, dtype=torch.float64)
    return Tokens(x, 1), AttentionInfo(cls_probs=cls, keys=keys, values=values)


def test_significance_is_head_summed_cls_attention_times_the_norm_of_all_heads_values():
    cls = torch.tensor([[[[0.5, 0.3, 0.2]], [[0.2, 0.2, 0.6]]]])  # [1, 2 heads, 1, 3]
    values = torch.tensor([[[[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]]]])
    attn = AttentionInfo(cls_probs=cls, values=values)
    # official: (0.3 + 0.2) * |(3, 4, 0, 0)| = 2.5 and (0.2 + 0.6) * |(1, 0, 0, 2)| = 0.8 sqrt(5)
    official = torch.tensor([2.5, 0.8 * math.sqrt(5)])
    torch.testing.assert_close(significance(attn, 1), (official / official.sum())[None])
    # ATS's form: 0.3 * 5 + 0.2 * 0 = 1.5 and 0.2 * 1 + 0.6 * 2 = 1.4
    torch.testing.assert_close(significance(attn, 1, per_head=True), torch.tensor([[1.5, 1.4]]) / 2.9)


def test_low_variance_pools_high_variance_prunes_each_image_of_one_batch():
    tokens, attn = hand_made()
    score = significance(attn, 1)
    assert score[0].var() == 0 and score[1].var() > 1e-3
    ppt = PPT([0], [3], threshold=1e-3)
    out = ppt.reduce(INSIDE, tokens, attn)
    assert ppt.pooled[INSIDE].tolist() == [True, False]
    unbiased = ((score - score.mean(dim=1, keepdim=True)) ** 2).sum(dim=1) / (8 - 1)  # torch.var's n - 1
    torch.testing.assert_close(ppt.variances[INSIDE], unbiased)
    assert out.n == 8 - 3 and out.size.shape == (2, 6, 1)
    # image 0 pooled: ToMe's merge of it alone, 3 tokens merged into others (sizes sum to the 8)
    tome = ToMe([0], [3]).reduce(INSIDE, Tokens(tokens.x[:1], 1), AttentionInfo(keys=attn.keys[:1]))
    torch.testing.assert_close(out.x[:1], tome.x)
    torch.testing.assert_close(out.size[:1], tome.size)
    assert out.size[0, 1:].sum() == 8 and out.size[0, 1:].max() > 1
    # image 1 pruned: the 3 least attended patches (1, 2, 3) gone, the rest most attended first
    torch.testing.assert_close(out.x[1, 1:], tokens.x[1, [8, 7, 6, 5, 4]])
    assert out.size[1].eq(1).all()
    assert torch.equal(out.prefix, tokens.prefix)


@pytest.mark.parametrize("threshold,pooled", [(0.0, [False, False]), (math.inf, [True, True])])
def test_threshold_zero_always_prunes_and_infinity_always_pools(threshold, pooled):
    tokens, attn = hand_made()
    ppt = PPT([0], [3], threshold=threshold)
    out = ppt.reduce(INSIDE, tokens, attn)
    assert ppt.pooled[INSIDE].tolist() == pooled
    if not pooled[0]:
        order = significance(attn, 1).argsort(dim=1, descending=True)[:, :5]
        torch.testing.assert_close(out.patches, torch.stack([tokens.patches[i, order[i]] for i in range(2)]))


def test_always_pooling_is_tome_and_always_pruning_drops_by_significance():
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = apply_reducer(tiny_vit(), PPT([1, 2], [4, 4], threshold=math.inf)).eval()(x)
        tome = apply_reducer(tiny_vit(), ToMe([1, 2], [4, 4])).eval()(x)
        torch.testing.assert_close(pooled, tome)
        pruned = apply_reducer(tiny_vit(), PPT([1, 2], [4, 4], threshold=0.0)).eval()(x)
    assert not torch.allclose(pruned, tome)


def mixed_model(trace: bool = False):
    """A tiny CLS ViT whose threshold splits the 4 images of a batch at block 1."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = apply_reducer(tiny_vit().double(), PPT([1, 2], [5, 5], threshold=math.inf)).eval()
    with torch.no_grad():
        model(x)
    variance = model.reducer.variances[Location(Site.INSIDE, 1)]
    low, high = variance.sort().values[1:3].tolist()
    model.reducer.threshold = (low + high) / 2  # 2 pool, 2 prune, none near the threshold
    return apply_reducer(model, model.reducer, trace_sources=trace), x


def test_a_mixed_batch_gives_each_image_its_own_result_with_sizes_summing_to_the_patches():
    model, x = mixed_model(trace=True)
    with torch.no_grad():
        batched = model(x)
        pooled = model.reducer.pooled[Location(Site.INSIDE, 1)]
        assert 0 < int(pooled.sum()) < len(x)
        assert model.last_tokens.size.shape[1] == 1 + 16 - 5 - 5
        sizes = model.last_tokens.patch_sizes()[..., 0].sum(dim=1)
        # a pruned image's patches stand for fewer of the 16; a pooled-only image's for all of them
        sources = model.last_tokens.source[:, 1:].sum(dim=(1, 2))
        torch.testing.assert_close(sizes, sources.to(sizes))
        for i in range(len(x)):
            torch.testing.assert_close(model(x[i : i + 1]), batched[i : i + 1])
    assert model.last_trace and all(t.shape[1] in (12, 7) for _, t in model.last_trace)


def test_sizes_sum_to_the_patch_count_when_every_image_pools():
    model = apply_reducer(tiny_vit(), PPT([0, 1, 2], [4, 4, 4], threshold=math.inf)).eval()
    with torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    assert model.last_tokens.n == 16 - 12
    assert model.last_tokens.patch_sizes().sum(dim=1).eq(16).all()


def test_dist_token_is_a_prefix_token_never_scored_or_pruned():
    model = apply_reducer(tiny_vit(prefix=2), PPT([1], [6], threshold=0.0)).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.reducer.pooled[Location(Site.INSIDE, 1)].tolist() == [False, False]
    assert model.last_tokens.x.shape[1] == 2 + 10


def deit_s_info():
    return backbone_info(tiny_vit(img=224, patch=16, depth=12))


def test_official_deit_s_counts_196_146_96_48_with_r_50_capped_at_half():
    ppt = PPT.from_schedule("multi", [3, 6, 9], [0.5] * 3, deit_s_info(), r=50)
    ppt.bind(deit_s_info())
    assert list(ppt.expected_tokens().values()) == [146, 96, 48]
    assert ppt.resolved_schedule() == {"rates": None, "r": [50, 50, 50]}


def test_keep_rate_counts_truncate_the_current_count_and_stop_at_half():
    info = deit_s_info()
    multi = PPT.from_schedule("multi", [3, 6, 9], [0.7] * 3, info)
    multi.bind(info)
    assert list(multi.expected_tokens().values()) == [int(196 * 0.7), int(137 * 0.7), int(95 * 0.7)]
    single = PPT.from_schedule("single", [3], [0.5], info)
    single.bind(info)
    assert list(single.expected_tokens().values()) == [98]
    with pytest.raises(ReductionError, match="at most half"):
        PPT.from_schedule("single", [3], [0.4], info)


def test_the_method_config_carries_the_official_deit_s_defaults():
    model = tl.prune(tiny_vit(img=224, patch=16, depth=12), "ppt", schedule="multi", r=50)
    ppt = model.reducer
    assert isinstance(ppt, PPT) and sorted(ppt.r) == [3, 6, 9]
    assert (ppt.threshold, ppt.prop_attn, ppt.score) == (7e-5, True, "official")
    assert list(ppt.expected_tokens().values()) == [146, 96, 48]
