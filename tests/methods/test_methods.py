"""Each training-free method on small cases whose right answer can be worked out on paper.

The behaviours encoded here were checked against the official implementations (ToMe's timm
patch, official EViT with the fused token on and off, TPS's squeeze) on random weights in float64;
see README "Faithfulness".
"""

from __future__ import annotations

import math

import pytest
import torch

from tnt_lightning.engine import AttentionInfo, Location, Site, Tokens
from tnt_lightning.methods import ETPS, EViT, RandomDrop, ToMe, TopK, ZeroTP, zerotp
from tnt_lightning.methods.common.similarity import random_partition_prune, sequential_partition_prune
from tnt_lightning.methods.common.squeeze import squeeze, squeeze_masked
from tnt_lightning.methods.zerotp import weighted_pagerank


def cls_probs(row: list[float], n: int) -> torch.Tensor:
    """[1, 1, 1, n]: the CLS query's attention row ``row`` over ``n`` tokens."""
    assert len(row) == n
    return torch.tensor(row)[None, None, None]


def tokens(n_patches: int, prefix: int, trace: bool = True) -> Tokens:
    x = torch.arange(float(prefix + n_patches))[None, :, None].repeat(1, 1, 2)  # token i = [i, i]
    return Tokens.start(x, prefix, trace=trace)


# CLS attends 0.1 / 0.4 / 0.2 / 0.3 to patches 0..3 (after the prefix).
ROW_P1 = [0.0, 0.1, 0.4, 0.2, 0.3]
ROW_P2 = [0.0, 0.9, 0.1, 0.4, 0.2, 0.3]  # the DIST column's 0.9 must be ignored


@pytest.mark.parametrize("prefix,row", [(1, ROW_P1), (2, ROW_P2)])
def test_topk_keeps_most_attended_patches_sorted_by_score(prefix, row):
    out = TopK([0], [0.5]).reduce(
        Location(Site.INSIDE, 0), tokens(4, prefix), AttentionInfo(cls_probs=cls_probs(row, 4 + prefix))
    )
    # patches 1 (0.4) and 3 (0.3), in that order, after the untouched prefix
    assert out.x[0, :, 0].tolist() == [*range(prefix), prefix + 1, prefix + 3]


def test_evit_fuses_the_rest_with_raw_cls_attention_weights():
    evit = EViT([0], [0.5])
    out = evit.reduce(Location(Site.INSIDE, 0), tokens(4, 1), AttentionInfo(cls_probs=cls_probs(ROW_P1, 5)))
    # kept patches 1, 3 (tokens 2, 4); fused = 0.1 * token 1 + 0.2 * token 3, not renormalised
    assert out.x[0, :, 0].tolist() == pytest.approx([0.0, 2.0, 4.0, 0.1 * 1 + 0.2 * 3])
    assert out.source[0, -1].nonzero().flatten().tolist() == [1, 3]


def test_evit_rounds_up_and_can_drop_without_fusing():
    out = EViT([0], [0.6], fuse_token=False).reduce(
        Location(Site.INSIDE, 0), tokens(4, 1), AttentionInfo(cls_probs=cls_probs(ROW_P1, 5))
    )
    assert out.x[0, :, 0].tolist() == [0.0, 2.0, 4.0, 3.0]  # ceil(0.6 * 4) = 3: patches 1, 3, 2


def test_evit_keeping_everything_is_a_no_op():
    t = tokens(4, 1)
    assert (
        EViT([0], [0.9]).reduce(Location(Site.INSIDE, 0), t, AttentionInfo(cls_probs=cls_probs(ROW_P1, 5)))
        is t
    )


def test_etps_squeezes_pruned_tokens_into_their_hosts():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])
    t = Tokens.start(x, 1, trace=True)
    out = ETPS([0], [0.5]).reduce(
        Location(Site.INSIDE, 0), t, AttentionInfo(cls_probs=cls_probs([0, 0.4, 0.3, 0.2, 0.1], 5))
    )
    hosts, _ = squeeze(x[:, 1:3], x[:, 3:5])
    assert torch.allclose(out.x[:, 1:], hosts)
    # token 3 ([1, .1]) joins host 1 ([1, 0]); token 4 joins host 2
    assert out.source[0, 1].nonzero().flatten().tolist() == [1, 3]
    assert out.source[0, 2].nonzero().flatten().tolist() == [2, 4]


def test_squeeze_weights_host_by_e_and_pruned_by_exp_cos():
    host = torch.tensor([[[1.0, 0.0]]])
    same = squeeze(host, torch.tensor([[[2.0, 0.0]]]))[0]  # cos 1: (e*h + e*q)/(2e)
    assert torch.allclose(same, torch.tensor([[[1.5, 0.0]]]), atol=1e-5)
    orthogonal = squeeze(host, torch.tensor([[[0.0, 1.0]]]))[0]  # cos 0: (e*h + 1*q)/(e+1)
    assert torch.allclose(orthogonal, torch.tensor([[[math.e, 1.0]]]) / (math.e + 1), atol=1e-6)


def test_masked_squeeze_equals_squeeze_on_the_split_tokens():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    keep = torch.tensor([1, 1, 0, 1, 0, 0.0], dtype=torch.float64).view(1, 6, 1).expand(2, -1, -1)
    updated = squeeze_masked(x, keep, 1 - keep)
    hosts, _ = squeeze(x[:, [0, 1, 3]], x[:, [2, 4, 5]])
    assert torch.allclose(updated[:, [0, 1, 3]], hosts)
    assert torch.equal(updated[:, [2, 4, 5]], x[:, [2, 4, 5]])


def test_random_drop_keeps_int_n_k_in_original_order():
    out = RandomDrop([0], [0.5], seed=0).reduce(Location(Site.AFTER, 0), tokens(5, 1), None)
    kept = out.x[0, 1:, 0].tolist()
    assert len(kept) == 2 and kept == sorted(kept) and out.x[0, 0, 0] == 0


def test_tome_merges_the_best_matched_a_token_by_size_weighted_mean():
    # N = 5 with CLS: A = positions 0, 2, 4; B = 1, 3. Token 4 equals token 3; CLS is never merged.
    keys = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0.8, 0.6], [0, 0, 1.0], [0, 0, 1.0]]])[:, None]
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0], [4.0]]])
    t = Tokens(x, 1, size=torch.tensor([[[1.0], [1.0], [1.0], [3.0], [1.0]]]))
    out = ToMe([0], [1]).reduce(Location(Site.INSIDE, 0), t, AttentionInfo(keys=keys))
    # [unmerged A sorted (0, 2), B (1, 3 <- 4)]; token 3 has size 3: (3*3 + 1*4) / 4
    assert out.x.flatten().tolist() == pytest.approx([0.0, 2.0, 1.0, 13 / 4])
    assert out.size.flatten().tolist() == [1.0, 1.0, 1.0, 4.0]


def test_tome_keeps_cls_and_dist_first_when_merging():
    keys = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(0))
    t = Tokens.start(torch.arange(8.0)[None, :, None], 2, trace=True)
    out = ToMe([0], [3]).reduce(Location(Site.INSIDE, 0), t, AttentionInfo(keys=keys))
    assert out.x[0, :2, 0].tolist() == [0.0, 1.0]  # [CLS, DIST, other unmerged A, other B]
    assert out.x.shape[1] == 5 and out.source.sum(1)[0].tolist() == [1] * 8


def test_weighted_pagerank_by_hand():
    a = torch.tensor([[[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]]])
    w1 = weighted_pagerank(a, 1)[0, 0]
    assert w1.tolist() == pytest.approx([1 / 6, 1 / 3, 1 / 2])  # w_j = sum_i A_ij / 3
    w2 = weighted_pagerank(a, 2)[0, 0]
    assert w2.tolist() == pytest.approx([1 / 12, 1 / 4, 2 / 3])
    assert w2.sum().item() == pytest.approx(1.0)


def test_weighted_pagerank_in_cache_sized_chunks_equals_the_whole_batch(monkeypatch):
    probs = torch.randn(7, 3, 20, 20).softmax(dim=-1)
    whole = weighted_pagerank(probs, 5)
    monkeypatch.setattr(zerotp, "CPU_CHUNK_BYTES", 2 * 3 * 20 * 20 * 4)  # two images per chunk
    assert torch.equal(weighted_pagerank(probs, 5), whole)
    single = torch.stack([weighted_pagerank(probs[i : i + 1], 5)[0] for i in range(7)])
    assert torch.allclose(whole, single, atol=1e-7)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_weighted_pagerank_iterates_half_precision_maps_in_float32_under_autocast(half):
    probs = torch.randn(5, 3, 20, 20).softmax(dim=-1).to(half)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = weighted_pagerank(probs, 30)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, weighted_pagerank(probs.float(), 30))


def test_zerotp_aggregates_heads_by_root_mean_square():
    probs = torch.stack([torch.eye(3), torch.full((3, 3), 1 / 3)])[None]  # two heads
    rms = ZeroTP([0], [0.5], [1], [0]).importance(probs, 1)
    assert rms[0].tolist() == pytest.approx([math.sqrt((1 / 9 + 1 / 9) / 2)] * 3)
    mean = ZeroTP([0], [0.5], [1], [0], head_aggregation="mean").importance(probs, 1)
    assert mean[0].tolist() == pytest.approx([1 / 3] * 3)


def test_sequential_partition_drops_the_unimportant_duplicate():
    features = torch.tensor([[[1.0, 0], [1.0, 0.01], [0, 1.0], [1.0, 1.0]]])
    importance = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    # order 0, 2, 3, 1: B = {0, 2}, A = {3, 1}; token 1 ~ token 0, so it goes
    assert sequential_partition_prune(features, importance, 1).tolist() == [[0, 2, 3]]


def test_random_partition_drops_the_a_token_most_similar_to_b():
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    a, b = perm[:3], perm[3:]
    features = torch.eye(6)
    features[a[1]] = features[b[2]]  # a[1] duplicates a B token
    importance = torch.arange(6.0, 0, -1)[None]  # token i has importance 6 - i
    kept = random_partition_prune(features[None], importance, 1, 5, generator=g)[0].tolist()
    assert sorted(kept) == sorted(set(range(6)) - {a[1].item()})
    assert kept == sorted(kept)  # ordered by importance, i.e. by index here


def test_zerotp_single_layer_keeps_int_n_k():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 2, 11, 11), -1)
    keys = torch.randn(1, 2, 11, 3)
    out = ZeroTP([0], [0.5], [5], [2]).reduce(
        Location(Site.AFTER, 0), Tokens.start(torch.randn(1, 11, 6), 1), AttentionInfo(probs, keys)
    )
    assert out.n == 5  # int(10 * .5) + 2 candidates, 2 removed by similarity
