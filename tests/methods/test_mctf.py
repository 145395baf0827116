"""MCTF: the criteria, the bidirectional matching, the pooling, the fused one-step-ahead attention,
the official counts and the FLOP count.

What the float64 comparison with the official code (mlvlab/MCTF) showed, kept without it: A (even
positions) fuses into B (odd) first, then B into the remaining A, on the same weights; attended and
large tokens are less likely to fuse; fused tokens are attention-and-size-weighted means; the block
applies the fused attention (columns summed, rows pooled); ``min(r, n // 2)`` per block with the
10-token floor.
"""

from __future__ import annotations

import math

import pytest
import torch

import tnt_lightning as tl
from helpers import tiny_vit
from tnt_lightning.engine import Location, ReductionError, Site, Tokens, apply_reducer
from tnt_lightning.engine.patch import backbone_info
from tnt_lightning.measure.flops import count_macs
from tnt_lightning.methods.mctf import MCTF, fuse, match, merge_count, pair_weights

E = torch.eye(6, dtype=torch.float64)


def hand_made() -> torch.Tensor:
    """[1, 7, 6] CLS and 6 patches; A = positions 0 (CLS), 2, 4, 6 and B = 1, 3, 5.

    Patch 2 equals patch 1 (the best A -> B pair); patch 5 is nearly patch 6 (the best B -> A pair
    once 2 has gone); patch 3 leans slightly towards patch 4, so it outranks patch 1 among the
    remaining B (best weight 0.55 against 0.5)."""
    x = torch.stack([E[0], E[1], E[1], E[2] + 0.1 * E[3], E[3], E[4] + 0.3 * E[5], E[4]])
    return x[None]


def uniform_probs(n: int, heads: int = 2) -> torch.Tensor:
    return torch.full((1, heads, n, n), 1.0 / n, dtype=torch.float64)


def step(
    x: torch.Tensor,
    r: int,
    probs: torch.Tensor,
    size: torch.Tensor | None = None,
    prefix: int = 1,
    tau_info: float = 0.0,
    tau_size: float = 0.0,
    bidirectional: bool = True,
) -> Tokens:
    """One fusion of ``r`` tokens, size-weighted means (the hand-made sequences are shorter than
    the official 10-token floor that :meth:`MCTF.reduce` applies)."""
    weight = pair_weights(x, probs, size, 1.0, tau_info, tau_size)
    matching = match(weight, r, prefix, bidirectional)
    return fuse(Tokens(x, prefix, size=size), probs, matching, "size", fuse_attention=False)[0]


def test_official_counts_half_the_patches_fractions_and_the_ten_token_floor():
    assert merge_count(16, 196, 1) == 16 and merge_count(16, 20, 1) == 10  # min(r, n // 2)
    assert merge_count(0.35, 196, 1) == 68  # int(196 * 0.35) of the current patches
    assert merge_count(20, 18, 1) == 9  # 19 tokens - 20 < 10: r = 19 - 10
    assert merge_count(16, 8, 2) == 0 and merge_count(16, 5, 1) == 0  # never below 0


def test_deit_s_counts_of_the_official_settings():
    info = backbone_info(tiny_vit(img=224, patch=16, depth=12))
    official = MCTF.from_schedule("multi", list(range(1, 12)), [0.5] * 11, info, r=16)
    official.bind(info)
    assert list(official.expected_tokens().values()) == list(range(180, 19, -16))
    fast = MCTF.from_schedule("multi", [3, 6, 9], [0.5] * 3, info, r=0.35)
    fast.bind(info)
    assert list(fast.expected_tokens().values()) == [128, 84, 55]  # 196 - 68, 128 - 44, 84 - 29
    single = MCTF.from_schedule("single", [2], [0.5], info)
    single.bind(info)
    assert list(single.expected_tokens().values()) == [98] and single.resolved_schedule() == {"r": [98.0]}
    with pytest.raises(ReductionError, match="at most half"):
        MCTF.from_schedule("single", [2], [0.4], info)


def test_pair_weights_are_the_product_of_the_three_criteria_by_hand():
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    probs = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    probs[..., :] = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)  # received: 0.1 ... 0.4
    size = torch.tensor([[[1.0], [2.0], [4.0], [1.0]]], dtype=torch.float64)
    weight = pair_weights(x, probs, size, tau_sim=1.0, tau_info=2.0, tau_size=4.0)
    cos = torch.tensor([[1 / math.sqrt(2), -1.0], [1 / math.sqrt(2), 0.0]])  # A = tokens 0, 2; B = 1, 3
    info = torch.tensor([1 / 0.1, 1 / 0.2, 1 / 0.3, 1 / 0.4]) / 10.0  # 1/attention over its max
    small = torch.tensor([1.0, 0.5, 0.25, 1.0])  # 1/size over its max
    expected = (
        (cos + 1)
        / 2
        * (info[[0, 2], None] * info[None, [1, 3]]) ** 0.5
        * (small[[0, 2], None] * small[None, [1, 3]]) ** 0.25
    )
    torch.testing.assert_close(weight[0], expected.double())
    assert pair_weights(x, None, None, 0.0, 2.0, 4.0).eq(1).all()  # every criterion off


def test_bidirectional_matching_fuses_a_into_b_then_b_into_a_in_the_official_order():
    x = hand_made()
    out = step(x, 2, uniform_probs(7))
    # kept A ascending (CLS, 4, 6 with 5 fused in), then kept B by best weight (3, then 1 with 2)
    expected = torch.stack([x[0, 0], x[0, 4], (x[0, 6] + x[0, 5]) / 2, x[0, 3], x[0, 1]])
    torch.testing.assert_close(out.x[0], expected)
    assert out.size[0, :, 0].tolist() == [1, 1, 2, 1, 2]
    one_way = step(x, 2, uniform_probs(7), bidirectional=False)
    # r = 2 from A to B: 2 -> 1 and 6 -> 5; then every B in position order (ToMe's)
    expected = torch.stack([x[0, 0], x[0, 4], x[0, 1], x[0, 3], (x[0, 5] + x[0, 6]) / 2])
    torch.testing.assert_close(one_way.x[0], expected)


def informative_pairs() -> torch.Tensor:
    """[1, 5, 6]: CLS, then two identical pairs (1, 2) and (3, 4): similarity cannot choose."""
    return torch.stack([E[0], E[1], E[1], E[2], E[2]])[None]


@pytest.mark.parametrize("attended,fused_pair", [(2, [3, 4]), (4, [1, 2])])
def test_the_attended_pair_is_kept_and_the_other_fused(attended, fused_pair):
    x = informative_pairs()
    probs = torch.full((1, 2, 5, 5), 0.1, dtype=torch.float64)
    probs[..., attended] = 0.6  # every query attends to this patch
    out = step(x, 1, probs, tau_info=20.0, bidirectional=False)
    assert out.size[0, :, 0].tolist().count(2) == 1
    merged = out.x[0, out.size[0, :, 0] == 2][0]
    torch.testing.assert_close(merged, x[0, fused_pair].mean(dim=0))


def test_a_large_token_is_less_likely_to_fuse():
    x = informative_pairs()
    size = torch.tensor([[1.0, 4.0, 1.0, 1.0, 1.0]], dtype=torch.float64)[..., None]
    out = step(x, 1, uniform_probs(5), size=size, tau_size=40.0, bidirectional=False)
    assert out.size[0, :, 0].tolist() == [1, 1, 4, 2]  # 3 -> 4 fused, the size-4 token 1 left alone


def test_attention_pooling_weights_by_attention_received_times_size_and_fuses_the_attention():
    x = hand_made()
    probs = torch.softmax(torch.randn(1, 2, 7, 7, generator=torch.Generator().manual_seed(0)), -1).double()
    size = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 2.0, 1.0], dtype=torch.float64)[None, :, None]
    tokens = Tokens(x, 1, size=size)
    weight = pair_weights(x, probs, size, 1.0, 0.0, 0.0)
    matching = match(weight, 2, 1, bidirectional=True)
    out, fused = fuse(tokens, probs, matching, "attention", fuse_attention=True)
    received = probs.mean(dim=(1, 2))[0]
    w = received * size[0, :, 0]
    # the same fusion as the hand-made case: 2 -> 1 and 5 -> 6 (similarity only)
    torch.testing.assert_close(out.x[0, 2], (w[6] * x[0, 6] + w[5] * x[0, 5]) / (w[6] + w[5]))
    torch.testing.assert_close(out.x[0, 4], (w[1] * x[0, 1] + w[2] * x[0, 2]) / (w[1] + w[2]))
    assert out.size[0, :, 0].tolist() == [1, 1, 3, 1, 4]
    assert torch.equal(out.x[:, :1], x[:, :1])  # the CLS row exactly as it came
    # fused attention: the columns of a group summed, its rows averaged with the same weights
    order = [[0], [4], [6, 5], [3], [1, 2]]
    columns = torch.stack([probs[..., g].sum(-1) for g in order], dim=-1)  # [1, H, 7, 5]
    rows = torch.stack([(columns[:, :, g] * w[g, None]).sum(2) / w[g].sum() for g in order], dim=2)
    torch.testing.assert_close(fused, rows)
    torch.testing.assert_close(fused.sum(-1), torch.ones(1, 2, 5, dtype=torch.float64))


def model(r, blocks=(1, 2), prefix=1, **options):
    reducer = MCTF(list(blocks), [r] * len(blocks), **options)
    return apply_reducer(tiny_vit(prefix=prefix).double(), reducer).eval()


def images(batch=3):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@torch.no_grad()
def test_the_block_applies_the_fused_attention_precise_recomputes_it_and_off_fuses_after():
    x = images()
    plain = tiny_vit().double().eval()(x)
    merged = model(4)(x)
    precise = model(4, one_step_ahead="precise")(x)
    off = model(4, one_step_ahead="off")
    assert off.reducer.locations() == [Location(Site.AFTER, 1), Location(Site.AFTER, 2)]
    after = off(x)
    assert not torch.allclose(merged, precise) and not torch.allclose(merged, after)
    # block 2 has nothing to fuse (10 tokens left): its one-step-ahead probabilities are dropped
    # and it runs its own attention, as without a step there
    floor = model(8)
    assert list(floor.reducer.expected_tokens().values()) == [9, 9]
    torch.testing.assert_close(floor(x), model(8, blocks=(1,))(x))
    assert not torch.allclose(model(8, blocks=(1,))(x), plain)


@torch.no_grad()
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_a_batch_equals_its_images_alone_and_sizes_cover_the_patches(prefix):
    m = apply_reducer(model(3, prefix=prefix), model(3, prefix=prefix).reducer, trace_sources=True)
    x = images()
    batched = m(x)
    assert m.last_tokens.n == 16 - 6
    assert m.last_tokens.patch_sizes().sum(dim=1).eq(16).all()
    sources = m.last_tokens.source[:, prefix:].sum(dim=(1, 2))
    torch.testing.assert_close(sources.to(x), torch.full((3,), 16.0, dtype=x.dtype))
    if prefix:  # prefix tokens stand for themselves, first and in order
        assert torch.equal(
            m.last_tokens.source[:, :prefix, :prefix], torch.eye(prefix).bool().expand(3, -1, -1)
        )
    for i in range(len(x)):
        torch.testing.assert_close(m(x[i : i + 1]), batched[i : i + 1])


def test_dist_is_second_and_never_fused():
    x = torch.stack([E[0], E[5], E[1], E[1], E[2], E[2], E[3]])[None]  # CLS, DIST, 5 patches
    out = step(x, 2, uniform_probs(7), prefix=2)
    assert torch.equal(out.x[:, :2], x[:, :2]) and out.size[0, :2, 0].tolist() == [1, 1]
    assert out.n == 3 and sorted(out.size[0, 2:, 0].tolist()) == [1, 2, 2]


def test_flops_count_the_one_step_ahead_attention_and_the_similarity_by_hand():
    d, hidden, classes, n0 = 48, 96, 10, 16

    def block(n_attn, n_mlp):  # LN, qkv, QK^T, AV, proj; LN, MLP
        return (
            5 * n_attn * d
            + 4 * n_attn * d * d
            + 2 * n_attn * n_attn * d
            + 5 * n_mlp * d
            + 2 * n_mlp * d * hidden
        )

    embed, head = n0 * d * 3 * 64, 5 * 13 * d + d * classes
    merged = model(4, blocks=(1,)).float()
    ahead = 5 * 17 * d + 2 * 17 * d * d + 17 * 17 * d  # LN1, queries and keys, QK^T on 17 tokens
    fused_attention = 5 * 13 * d + 13 * d * d + 13 * 13 * d + 13 * d * d  # LN1, values, AV, proj on 13
    rest = 5 * 13 * d + 2 * 13 * d * hidden  # LN2 and the MLP on 13
    similarity = 9 * 8 * d  # A (9 tokens, CLS included) x B (8), width D
    expected = embed + block(17, 17) + ahead + similarity + fused_attention + rest + 2 * block(13, 13) + head
    assert count_macs(merged, torch.randn(1, 3, 32, 32)) == expected
    off = model(4, blocks=(1,), one_step_ahead="off").float()  # after block 1, with its own attention
    expected = embed + 2 * block(17, 17) + similarity + 2 * block(13, 13) + head
    assert count_macs(off, torch.randn(1, 3, 32, 32)) == expected


def test_the_method_config_carries_the_official_defaults():
    m = tl.prune(tiny_vit(img=224, patch=16, depth=12), "mctf", schedule="multi", r=16)
    reducer = m.reducer
    assert isinstance(reducer, MCTF) and sorted(reducer.r) == list(range(1, 12))
    options = (reducer.tau_sim, reducer.tau_info, reducer.tau_size, reducer.bidirectional)
    assert options == (1.0, 20.0, 40.0, True)
    assert (reducer.one_step_ahead, reducer.pooling, reducer.prop_attn) == ("merged", "attention", True)
    assert list(reducer.expected_tokens().values())[-1] == 20


@pytest.mark.parametrize("checkpointed", [False, True])
def test_fine_tuning_trains_through_the_fused_attention(checkpointed):
    # merged: the fused block's values never see the queries and keys, which get their gradient
    # only through the fused one-step-ahead attention (the matching and pooling weights are constants)
    m = apply_reducer(tiny_vit(), MCTF([1], [4])).train()
    m.set_grad_checkpointing(checkpointed)
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    grad = m.blocks[1].attn.qkv.weight.grad
    assert grad[: 2 * 48].abs().sum() > 0 and grad[2 * 48 :].abs().sum() > 0
