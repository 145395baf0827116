"""DiffRate: the ranking, the prune and merge steps, the counts per block, the schedules and the cost.

What the float64 comparison with the official code (OpenGVLab/DiffRate) showed, kept without it:
inside every block the patches are ranked by the head-averaged CLS attention; the first ``p`` stay;
the rest after the first ``m`` go into their most cosine-similar kept patch by a plain mean, their
size times that similarity added to its size; the released schedules give the official counts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import tnt_lightning as tl
from helpers import run_py, tiny_vit
from tnt_lightning.engine import (
    AttentionInfo,
    Location,
    ReductionError,
    Site,
    Tokens,
    analytic,
    apply_reducer,
)
from tnt_lightning.engine.patch import backbone_info
from tnt_lightning.measure.flops import count_macs, token_trace
from tnt_lightning.methods.diffrate import (
    RELEASED,
    DiffRate,
    candidates,
    patch_counts,
    rate_equivalent,
    released_for_rate,
)

INSIDE = Location(Site.INSIDE, 0)


def cls_attention(scores: list[list[float]], prefix: int) -> AttentionInfo:
    """The CLS query's attention of one image, per head, over ``prefix`` prefix tokens (0.1 each)
    followed by patches with the given scores."""
    rows = torch.tensor([[0.1] * prefix + head for head in scores], dtype=torch.float64)
    return AttentionInfo(cls_probs=rows[None, :, None, :])


def test_prune_keeps_the_patches_of_highest_head_averaged_cls_attention_most_attended_first():
    # head means 0.3, 0.5, 0.1, 0.4, 0.2: the two heads disagree, only their mean ranks
    attn = cls_attention([[0.5, 0.2, 0.2, 0.3, 0.0], [0.1, 0.8, 0.0, 0.5, 0.4]], prefix=2)
    x = torch.arange(7, dtype=torch.float64)[None, :, None].expand(1, 7, 3).clone()
    out = DiffRate([3], [3]).reduce(INSIDE, Tokens(x, 2), attn)
    assert out.x[0, :, 0].tolist() == [0, 1, 3, 5, 2]  # CLS, DIST, then patches 1, 3, 0
    assert out.size is None


def test_merge_sends_each_tail_patch_to_its_most_similar_kept_patch_by_a_plain_mean():
    # patches ranked 0..4 by CLS attention; prune keeps 4 (patch 4, the most different, is dropped),
    # merge keeps 2: patch 2 goes into patch 0 (cosine 0.99), patch 3 into patch 1 (cosine 1)
    attn = cls_attention([[0.5, 0.4, 0.3, 0.2, 0.1]], prefix=1)
    patches = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.0, 2.0], [5.0, 5.0]], dtype=torch.float64)
    x = torch.cat([torch.tensor([[7.0, 7.0]], dtype=torch.float64), patches])[None]
    out = DiffRate([4], [2]).reduce(INSIDE, Tokens(x, 1), attn)
    assert out.n == 2
    torch.testing.assert_close(out.x[0, 0], x[0, 0])
    torch.testing.assert_close(out.x[0, 1], (patches[0] + patches[2]) / 2)
    torch.testing.assert_close(out.x[0, 2], (patches[1] + patches[3]) / 2)
    # a merged token's size grows by the source's size times its similarity
    similarity = F.cosine_similarity(patches[2], patches[0], dim=0)
    one = x.new_tensor(1.0)
    torch.testing.assert_close(out.size[0, :, 0], torch.stack([one, 1 + similarity, 2 * one]))
    # ToMe's alternatives: the size-weighted mean and the plain count
    sizes = torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0], [1.0]]], dtype=torch.float64)
    out = DiffRate([4], [2], merge_mean="size", size_update="count").reduce(INSIDE, Tokens(x, 1, sizes), attn)
    torch.testing.assert_close(out.x[0, 1], (3 * patches[0] + patches[2]) / 4)
    assert out.size[0, :, 0].tolist() == [1.0, 4.0, 2.0]


def test_a_dist_token_is_never_a_merge_destination():
    attn = cls_attention([[0.5, 0.4, 0.1]], prefix=2)
    # patch 2 is parallel to the DIST token and orthogonal to the kept patches: it still merges into one
    x = torch.tensor([[[1.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.9, 0.2], [0.0, 1.0]]], dtype=torch.float64)
    out = DiffRate([3], [2]).reduce(INSIDE, Tokens(x, 2), attn)
    torch.testing.assert_close(out.prefix, x[:, :2])
    torch.testing.assert_close(out.x[0, 3], (x[0, 3] + x[0, 4]) / 2)


def deit_shaped(prefix: int = 1, dim: int = 48):
    """A random ViT with DeiT's 196 patches and 12 blocks, narrow so that it runs in milliseconds."""
    return tiny_vit(prefix=prefix, img=224, patch=16, depth=12, dim=dim)


@pytest.mark.parametrize("prefix", [1, 2])
def test_every_block_runs_on_the_released_counts(prefix):
    model = tl.prune(deit_shaped(prefix), "diffrate", released="deit_s_2.9g")
    _, prune, merge = RELEASED["deit_s_2.9g"]
    n, expected = 196, []
    for p, m in zip(prune, merge, strict=True):
        expected.append((prefix + n, prefix + min(n, p - 1, m - 1)))
        n = min(n, p - 1, m - 1)
    assert token_trace(model) == expected
    # the official DeiT-S counts, block after block (CLS included), and 2 patches in the last block
    assert [b - prefix + 1 for _, b in expected] == [197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3]
    assert model.reducer.resolved_schedule()["prune_kept"] == list(prune)


def test_a_batch_gives_each_image_its_own_logits():
    model = tl.prune(deit_shaped(2), "diffrate", released="deit_s_2.3g").double()
    x = torch.randn(3, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


def test_gflops_are_the_blocks_on_their_tokens_plus_the_merge_similarity_products():
    dim = 48
    model = tl.prune(deit_shaped(1, dim), "diffrate", released="deit_s_2.9g")
    _, prune, merge = RELEASED["deit_s_2.9g"]
    total, n = 196 * dim * 3 * 16 * 16, 196  # patch embedding
    for p, m in zip(prune, merge, strict=True):
        kept, merged = min(n, p - 1), min(n, p - 1, m - 1)
        total += analytic.attn_part(1 + n, dim) + analytic.mlp_part(1 + merged, dim, 2 * dim)
        total += (kept - merged) * merged * dim  # each tail patch against each kept one
        n = merged
    total += 5 * (1 + n) * dim + dim * 10  # final LayerNorm and head
    assert count_macs(model, torch.randn(1, 3, 224, 224)) == total


def test_the_released_deit_s_schedule_costs_what_the_official_count_names():
    """The official count (no LayerNorm, 197 tokens in the patch embedding, a 1000-class head) of
    the released DeiT-S schedules, recomputed from their kept numbers: 2.905 for deit_s_2.9g."""
    for name, official in (("deit_s_2.3g", 2.327225856), ("deit_s_2.9g", 2.905256448)):
        _, prune, merge = RELEASED[name]
        c, n, flops = 384, 197, 197 * 384 * 768 + 384 * 1000
        for p, m in zip(prune, merge, strict=True):
            flops += 4 * n * c * c + 2 * n * n * c
            n = min(n, p, m)
            flops += 8 * n * c * c
        assert flops / 1e9 == pytest.approx(official, abs=1e-9)


def test_keep_rate_chooses_the_released_schedule_of_nearest_block_cost():
    deit_s = backbone_info(tiny_vit(img=224, patch=16, depth=12, dim=384, heads=6, mlp_ratio=4.0))
    rates = {name: rate_equivalent(*patch_counts(name, 196), deit_s) for name in RELEASED if "deit_s" in name}
    assert list(rates) == sorted(rates, key=rates.get)  # 2.3g cheapest ... 3.1g dearest
    assert released_for_rate(0.5, deit_s) == "deit_s_2.3g"
    assert released_for_rate(rates["deit_s_2.9g"] + 0.01, deit_s) == "deit_s_2.9g"
    with pytest.raises(ReductionError, match=r"keep_rate=0.3 .*deit_s_2.3g \(0.50\)"):
        released_for_rate(0.3, deit_s)


def test_released_counts_scale_to_another_patch_count_by_floor():
    prune, merge = patch_counts("deit_s_2.9g", 64)
    # (196 * 64) // 196, (195 * 64) // 196, (189 * 64) // 196; the last block's 2 patches: 0
    assert prune[:3] == [64, 63, 61] and merge[-1] == 0


def test_a_bad_schedule_name_or_shape_is_refused_naming_what_would_do():
    with pytest.raises(ReductionError, match=r"deit_s_2.8g.*deit_s_2.9g"):
        tl.prune(deit_shaped(), "diffrate", released="deit_s_2.8g")
    with pytest.raises(ReductionError, match="has 24 blocks, this backbone 12"):
        tl.prune(deit_shaped(), "diffrate", released="mae_l_31.0g")
    with pytest.raises(ReductionError, match=r"for \[12, 24, 32\]-block ViTs, this backbone has 4"):
        tl.prune(tiny_vit(), "diffrate", keep_rate=0.5)
    with pytest.raises(ReductionError, match="both"):
        tl.prune(tiny_vit(), "diffrate", prune_kept=[5, 4, 3, 2])
    with pytest.raises(ReductionError, match="merge_mean"):
        DiffRate([1], [1], merge_mean="median")


def test_explicit_kept_numbers_count_the_cls_token_as_the_official_file():
    model = tl.prune(tiny_vit(), "diffrate", prune_kept=[17, 12, 9, 9], merge_kept=[15, 12, 7, 3])
    assert token_trace(model) == [(17, 15), (15, 12), (12, 7), (7, 3)]
    assert apply_reducer(tiny_vit(), DiffRate([16, 16, 16, 16], [16, 16, 16, 16])).reducer.locations() == []


def test_the_record_keeps_the_keep_rate_only_when_it_chose_the_schedule():
    chosen = tl.prune(deit_shaped(), "diffrate", keep_rate=0.5).reducer.resolved_schedule()
    assert chosen["rates"] == [0.5] * 12 and chosen["released"] in RELEASED
    named = tl.prune(deit_shaped(), "diffrate", released="deit_b_8.7g").reducer.resolved_schedule()
    assert named["rates"] is None and named["released"] == "deit_b_8.7g"


def test_another_backbone_chooses_among_the_schedules_of_its_depth_and_pooling():
    narrow = backbone_info(deit_shaped())  # 12 blocks, CLS-pooled, width 48: no released model's shape
    assert candidates(narrow) == [name for name in RELEASED if name.startswith("deit_")]
    assert candidates(backbone_info(tiny_vit(img=224, patch=16, depth=24))) == [
        name for name in RELEASED if name.startswith("mae_l_")
    ]


# -- the search (method.released=search, task=train) ------------------------------------------------


def only(candidate: int, count: int) -> torch.Tensor:
    """Search logits that put all probability on candidate index ``candidate`` of ``count``."""
    logits = torch.full((count,), -math.inf, dtype=torch.float64)
    logits[candidate] = 0.0
    return logits


def test_only_a_search_trains_and_its_schedule_comes_from_its_parameters():
    released = tl.prune(deit_shaped(), "diffrate", released="deit_s_2.9g").reducer
    assert not released.needs_training() and released.trainable_parameters() == []
    model = tl.prune(tiny_vit(img=64), "diffrate", keep_rate=0.5, released="search")  # 64 patches
    search = model.reducer
    assert search.needs_training() and search.training_key()["target"] == 0.5
    assert search.candidates(0).tolist() == [64] and search.candidates(1).tolist() == list(range(64, 0, -4))
    # untrained (uniform): the mean candidate, 34, rounded up, in every block but the first
    assert search.kept_numbers() == ([64, 34, 34, 34], [64, 34, 34, 34])
    with torch.no_grad():
        search.prune_logits[2].copy_(only(3, 16))  # 52 patches
        search.merge_logits[2].copy_(only(5, 16))  # 44 patches
    assert search.kept_numbers() == ([64, 34, 52, 34], [64, 34, 44, 34])
    assert token_trace(model) == [(65, 65), (65, 35), (35, 35), (35, 35)]


def hand_made_search(prefix: int) -> tuple[DiffRate, Tokens, AttentionInfo]:
    """A 2-block search on 8 patches (candidates 8, 6, 4, 2) whose block 1 keeps 6 by pruning and 4
    by merging; the patches' CLS attention ranks them 7, 6, ..., 0."""
    search = DiffRate([8, 8], [8, 8], released="search", chosen_by=0.5, granularity=2).double()
    with torch.no_grad():
        search.prune_logits[1].copy_(only(1, 4))
        search.merge_logits[1].copy_(only(2, 4))
    search.bind(backbone_info(tiny_vit(prefix=prefix, depth=2)))  # 16 patches: only its width counts
    search.train()
    patches = torch.eye(8, dtype=torch.float64)
    patches[1] = patches[7] + 0.1 * patches[1]  # patch 1 (ranked 7th) is like patch 7 (ranked 1st)
    patches[2] = patches[4] + 0.1 * patches[2]  # patch 2 (ranked 6th) is like patch 4 (ranked 4th)
    patches[3] = patches[6] + 0.1 * patches[3]  # patch 3 (ranked 5th) is like patch 6 (ranked 2nd)
    x = torch.cat([torch.full((prefix, 8), 5.0, dtype=torch.float64), patches])[None]
    ones = torch.ones(1, prefix + 8, 1, dtype=torch.float64)
    cls = torch.cat([torch.full((prefix,), 0.01), torch.arange(1, 9) / 36.0]).to(torch.float64)
    return search, Tokens(x, prefix, size=ones, policy=ones), AttentionInfo(cls_probs=cls.view(1, 1, 1, -1))


@pytest.mark.parametrize("prefix", [1, 2])
def test_a_search_step_masks_the_pruned_and_merged_patches_and_merges_in_place(prefix):
    search, tokens, attn = hand_made_search(prefix)
    search._searched = []
    out = search.search_step(1, tokens, attn)
    # sorted: patches 7, 6, 5, 4 kept; 3 and 2 merged into 6 and 4; 1 and 0 pruned
    order = [7, 6, 5, 4, 3, 2, 1, 0]
    assert out.n == 8 and out.policy[0, :, 0].tolist() == [1.0] * prefix + [1, 1, 1, 1, 0, 0, 0, 0]
    patches = tokens.patches[0, order]
    torch.testing.assert_close(out.patches[0, 3], (patches[3] + patches[5]) / 2)  # 4 with 2
    torch.testing.assert_close(out.patches[0, 1], (patches[1] + patches[4]) / 2)  # 6 with 3
    torch.testing.assert_close(out.patches[0, [0, 2]], patches[[0, 2]])
    torch.testing.assert_close(out.patches[0, 4:], patches[4:])  # merged and pruned stay, masked
    # sizes: each source's similarity x size clamped at 1 (the search's clamp), added to its host
    assert out.size[0, prefix:, 0].tolist() == [1, 2, 1, 2, 1, 1, 1, 1]
    assert [(int(p), int(m)) for p, m in search._searched] == [(7, 5)]


def test_the_search_flops_are_the_official_count_of_the_kept_numbers_and_reach_the_parameters():
    model = tl.prune(tiny_vit(img=64), "diffrate", keep_rate=0.5, released="search").train()
    search = model.reducer
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    out = search.training_loss(model, x, y, label_smoothing=0.0)
    d, m, n = 48, 96, 65
    block = lambda a, b: 4 * a * d * d + 2 * a * a * d + 2 * b * d * m  # noqa: E731
    assert search.search_flops().item() == block(n, n) + block(n, 35) + 2 * block(35, 35)
    target = 0.5 * 4 * block(n, n) / 1e9
    assert out.stats["flops_loss"].item() == pytest.approx((search.search_flops().item() / 1e9 - target) ** 2)
    out.loss.backward()
    grads = {name: p.grad.abs().sum().item() for name, p in search.trainable_parameters()}
    assert grads["prune_logits.0"] == grads["merge_logits.0"] == 0  # block 0 has one candidate
    assert all(grads[f"{step}_logits.{b}"] > 0 for step in ("prune", "merge") for b in (1, 2, 3))


def test_the_token_mask_is_hard_forward_and_the_keep_probability_backward():
    search, _, _ = hand_made_search(1)
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    mask = search.token_mask(logits, 1, kept=3, upto=6)  # candidates 8, 6, 4, 2 (+ CLS)
    assert mask.tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1]
    probs = logits.softmax(dim=0)
    keep = torch.stack([probs[[c for c, n in enumerate((8, 6, 4, 2)) if i < n + 1]].sum() for i in range(9)])
    weights = torch.arange(9, dtype=torch.float64)
    (grad,) = torch.autograd.grad((mask * weights).sum(), logits)
    torch.testing.assert_close(grad, torch.autograd.grad((keep * weights).sum(), logits)[0])


SEARCH_ON_MNIST = [
    "method=diffrate",
    "method.released=search",
    "keep_rate=0.5",
    "method.flops_weight=1.0e5",  # the FLOPs term is in GFLOPs: vit_mnist has about 0.01
    "data.train_overrides.epochs=1",
    "data.train_overrides.warmup_epochs=0",
    "logger=csv",
]


@pytest.mark.slow
def test_the_search_trains_once_into_the_store_and_evaluation_runs_its_schedule(tmp_path):
    """``task=train`` on the embedded setting (vit_mnist on MNIST, one epoch; random backbone weights,
    so that no backbone is pretrained): the artefact holds the search's logits only, and an
    evaluation loads it without training."""
    args = [*SEARCH_ON_MNIST, "model.weights=random"]
    proc = run_py(["task=train", *args], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trained,) = (tmp_path / "cache" / "methods").rglob("trained.pth")
    state = torch.load(trained, map_location="cpu", weights_only=True)["state_dict"]
    assert sorted(state) == sorted(f"{step}_logits.{b}" for step in ("prune", "merge") for b in range(6))
    proc = run_py([*args, "measure.throughput=false"], tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training diffrate" not in proc.stderr
    record = json.loads((tmp_path / "results" / "results.jsonl").read_text().splitlines()[-1])
    assert record["task"] == "eval" and str(trained) in str(record["details"]["method_weights"])


def test_task_train_on_a_released_schedule_names_the_override_that_searches_one(compose_cfg):
    """DiffRate's defaults run a released schedule, which trains nothing: task=train says so and
    names the override its registration declares (method.released=search)."""
    from tnt_lightning.errors import ConfigError
    from tnt_lightning.tasks.train import train

    cfg = compose_cfg(
        "task=train", "method=diffrate", "model=deit_small", "model.weights=random", "data=synthetic"
    )
    with pytest.raises(ConfigError, match=r"nothing to train \(it trains with method\.released=search\)"):
        train(cfg)
