"""Haurum et al.'s training-free baselines, timm backbones in general, and two fixes of existing methods."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from helpers import SHORT_PRETRAIN, compose_config, run_py, tiny_vit
from tnt_lightning.engine import BackboneInfo, ReductionError, Tokens, analytic, apply_reducer, backbone_info
from tnt_lightning.errors import ConfigError
from tnt_lightning.lit import OptimConfig, TokenReductionModule
from tnt_lightning.measure import count_macs
from tnt_lightning.methods import TNT, build_reducer
from tnt_lightning.methods.assembly import prune_with, reducer_for
from tnt_lightning.methods.ats import inverse_transform_sample, sample_points, unique_padded
from tnt_lightning.methods.dpcknn import dpc_knn
from tnt_lightning.methods.kmedoids import k_medoids
from tnt_lightning.methods.patchmerger import PatchMergerStage
from tnt_lightning.methods.sinkhorn import SinkhornStage, sinkhorn_assignment
from tnt_lightning.methods.sit import SlimmingStage
from tnt_lightning.methods.spatial import centre_distances, threshold_for
from tnt_lightning.models import BackboneSpec, WeightsUnavailableError, backbones, create_model
from tnt_lightning.models.backbones import check_engine_support
from tnt_lightning.tasks.inputs import resolve_inputs
from tnt_lightning.tasks.token_maps import patch_owners


def build(overrides: list[str], model, tmp_path):
    cfg = compose_config(overrides, tmp_path)
    pruning = BackboneSpec(name="probe", arch={"depth": 1}).pruning
    return reducer_for(model, cfg.method, cfg.schedule, cfg.keep_rate, pruning)


# -- fixes ---------------------------------------------------------------------------------------


def test_compat_single_layer_dynamicvit_records_the_three_stages_it_runs(tmp_path):
    model = tiny_vit(prefix=1, depth=12, img=224, patch=16)
    for method in ("dynamicvit", "dtps"):
        reducer, record = build(
            [f"method={method}", "keep_rate=0.6", "paper_flops_compat=true"], model, tmp_path
        )
        assert reducer.blocks == [2, 5, 8]
        assert record["blocks"] == [2, 5, 8] and record["rates"] == [0.6, 0.6, 0.6]
        reducer, record = build([f"method={method}", "keep_rate=0.6"], model, tmp_path)
        assert record["blocks"] == [2] and record["rates"] == [0.6]


def official_pre_block_order(x: torch.Tensor, s: int, seed: int) -> list[list[int]]:
    """The official TNT pre-block step, per sample: kept patch indices in output order.

    ``torch.rand(B, n)`` from the CPU generator (moved to the device), then ``randperm(n)`` from the
    device's generator (on CPU: the same generator, in that order), seeded as the method's are.
    """
    batch, n = x.shape[0], x.shape[1] - 1
    cpu = torch.Generator().manual_seed(seed)
    on_device = cpu if x.device.type == "cpu" else torch.Generator(x.device).manual_seed(seed)
    importance = torch.rand(batch, n, generator=cpu)
    perm = torch.randperm(n, device=x.device, generator=on_device).cpu()
    a, b = perm[: n // 2], perm[n // 2 :]
    patches = F.normalize(x[:, 1:].cpu(), dim=-1)
    best = (patches[:, a] @ patches[:, b].transpose(1, 2)).amax(dim=-1)
    orders = []
    for i in range(batch):
        dropped = set(a[best[i].topk(s).indices].tolist())
        survivors = [j for j in perm.tolist() if j not in dropped]
        orders.append(sorted(survivors, key=lambda j: -importance[i, j].item()))
    return orders


def tnt_pre_block_order(device: str) -> tuple[list[list[int]], list[list[int]]]:
    model = tiny_vit(prefix=1, depth=6, img=64, patch=8)  # 64 patches
    info = backbone_info(model)
    tnt = TNT(info, "multi", [2, 3, 4], [0.9, 0.9, 0.9], pre_similarity_tokens=10, seed=7).to(device)
    tnt.bind(info)
    tnt.eval()
    x = torch.randn(3, 1 + 64, info.embed_dim, generator=torch.Generator().manual_seed(1)).to(device)
    kept = tnt.pre_block_similarity(Tokens.start(x, 1, trace=True))
    got = kept.source[:, 1:, 1:].float().argmax(dim=-1).tolist()
    return got, official_pre_block_order(x, 10, seed=7)


def test_tnt_multi_layer_draws_importance_then_partition_as_the_official_code():
    got, expected = tnt_pre_block_order("cpu")
    assert got == expected


@pytest.mark.gpu
def test_tnt_multi_layer_importance_comes_from_the_cpu_generator_on_cuda():
    """On CUDA the importance is the CPU generator's draw (as the official ``rand(...).to(device)``)."""
    got, expected = tnt_pre_block_order("cuda")
    assert got == expected


# -- any timm VisionTransformer --------------------------------------------------------------------


def timm_spec(tmp_path, name: str, *overrides: str) -> BackboneSpec:
    """The spec of ``model=timm`` with the input size resolved, as a run resolves it."""
    cfg = compose_config(["model=timm", f"model.timm_name={name}", *overrides], tmp_path)
    resolve_inputs(cfg)
    return instantiate(cfg.model)


def analytic_gflops(model, tokens_per_block, final_tokens=None) -> float:
    """docs/methods/flops.md#per-block-formula for a timm ViT; mean-pooled models with fc_norm
    normalise one pooled vector."""
    info = backbone_info(model)
    if isinstance(model.norm, torch.nn.Identity) and isinstance(model.fc_norm, torch.nn.LayerNorm):
        final_tokens = 1
    patch = model.patch_embed.patch_size[0]
    macs = analytic.vit_macs(
        tokens_per_block,
        info.embed_dim,
        info.mlp_hidden,
        info.num_patches,
        patch,
        3,
        model.num_classes,
        final_tokens=final_tokens,
    )
    return macs / 1e9


@pytest.mark.parametrize(
    "name,size,prefix",
    [
        ("vit_small_patch16_224", 224, 1),
        pytest.param("vit_base_patch16_224", 224, 1, marks=pytest.mark.slow),
        pytest.param("vit_large_patch16_224", 224, 1, marks=pytest.mark.slow),
        ("vit_base_patch16_reg4_gap_256", 256, 4),  # 4 register tokens, no CLS, mean pooling
        ("deit3_small_patch16_224", 224, 1),
    ],
)
def test_timm_backbone_gflops_equal_the_analytic_formula(name, size, prefix, tmp_path):
    spec = timm_spec(tmp_path, name, f"model.input_size=[3,{size},{size}]")
    model = create_model(spec).eval()
    info = backbone_info(model)
    assert spec.name == name and info.num_prefix == prefix
    n = info.num_patches + prefix
    got = count_macs(model, torch.randn(1, 3, size, size)) / 1e9
    assert got == pytest.approx(analytic_gflops(model, [n] * info.depth), abs=1e-12)


def test_register_tokens_are_prefix_tokens_kept_outside_every_count(tmp_path):
    """vit_base_patch16_reg4_gap_256: 256 patches, 4 registers; random keeps int(256 * 0.5) patches."""
    spec = timm_spec(tmp_path, "vit_base_patch16_reg4_gap_256", "model.input_size=[3,256,256]")
    model = create_model(spec).eval()
    cfg = compose_config(["model=timm", "method=random", "keep_rate=0.5"], tmp_path)
    model, record = prune_with(model, cfg.method, cfg.schedule, 0.5, spec.pruning, trace_sources=True)
    assert record["blocks"] == [2]  # the paper's "after the 3rd of 12 blocks"
    x = torch.randn(1, 3, 256, 256)
    got = count_macs(model, x) / 1e9
    assert model.last_tokens.x.shape[1] == 4 + 128
    source = model.last_trace[-1][1][0]
    assert source[:4, :4].equal(torch.eye(4, dtype=torch.bool))  # registers stay first, untouched
    assert got == pytest.approx(analytic_gflops(model, [260] * 3 + [132] * 9), abs=1e-12)


def test_timm_pruning_defaults_scale_with_depth(tmp_path):
    """ViT-L (24 blocks): "after the 3rd of 12 blocks" is after the 6th; [2,3,4] -> [5,7,9]."""
    spec = timm_spec(tmp_path, "vit_large_patch16_224")
    info = BackboneInfo(24, 1024, 16, 4096, 1, 196, True, False, "token")
    for method, schedule, blocks in (
        ("topk", "single", [5]),
        ("topk", "multi", [5, 7, 9]),
        ("dynamicvit", "multi", [5, 11, 17]),
        ("evit", "multi", [7, 13, 19]),
        ("zerotp", "multi", [1, 5, 11, 17, 21]),
    ):
        cfg = compose_config([f"method={method}", f"schedule={schedule}", "keep_rate=0.7"], tmp_path)
        _, record = build_reducer(cfg.method, cfg.schedule, 0.7, spec.pruning, info)
        assert record["blocks"] == blocks, (method, schedule)
    resolved = spec.pruning.resolved(24, 576)  # a 384-pixel ViT: 24 x 24 patches
    assert (resolved.single_block, resolved.similarity_tokens, resolved.pre_similarity_tokens) == (5, 73, 118)
    # A model config that gives its defaults keeps them (the paper's DeiT: 12 blocks, unscaled).
    deit = instantiate(compose_config(["model=deit_small_distilled"], tmp_path).model).pruning
    assert deit.resolved(12, 196) == deit


@pytest.mark.parametrize(
    "name,reason",
    [
        ("vit_base_patch16_siglip_224", "attention head (global_pool='map')"),
        ("vit_relpos_small_patch16_224", "relative position biases"),
        ("vit_base_patch16_rpn_224", "res-post-norm"),
        ("vit_small_patch16_18x2_224", "in parallel"),
        ("vit_no_such_model", "is not a timm model"),
        ("vit_small_patch16_384", "set model.input_size=[3, 384, 384]"),
    ],
)
def test_models_the_engine_cannot_serve_fail_early_naming_model_and_reason(name, reason, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(reason)) as err:  # a 384 model asked for 224 inputs
        create_model(timm_spec(tmp_path, name, "model.input_size=[3,224,224]"))
    assert name in str(err.value)


def test_gated_attention_fails_early(tmp_path):
    spec = BackboneSpec(name="gated", arch={"depth": 4}, input_size=(3, 32, 32))
    model = tiny_vit()
    check_engine_support(model, spec)
    model.blocks[1].attn.gate = torch.nn.Linear(48, 48)
    with pytest.raises(ConfigError, match="model 'gated' .* gated"):
        check_engine_support(model, spec)


def test_offline_tagged_hub_name_gives_the_clear_weights_error(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "_reachable", lambda *a, **k: False)
    monkeypatch.setattr(backbones, "_hub_cached", lambda *a, **k: False)
    spec = timm_spec(tmp_path, "vit_small_patch16_224.augreg_in21k_ft_in1k")
    model = create_model(spec)
    with pytest.raises(WeightsUnavailableError, match="cannot be reached.*model.checkpoint="):
        backbones.load_hub_weights(model, spec)


# -- Haurum et al.'s training-free baselines -------------------------------------------------------


def run_method(model, method: str, rate: float, tmp_path, *overrides: str, trace: bool = False):
    cfg = compose_config([f"method={method}", f"keep_rate={rate}", *overrides], tmp_path)
    pruning = BackboneSpec(name="probe", arch={"depth": 1}).pruning
    return prune_with(model, cfg.method, cfg.schedule, rate, pruning, trace_sources=trace)


def deit_like(prefix: int = 1):
    """A tiny random ViT with DeiT's 14 x 14 patch grid (and 12 blocks)."""
    return tiny_vit(prefix=prefix, depth=12, img=224, patch=16, dim=48, heads=4)


def test_spatial_keeps_the_achievable_count_nearest_the_target_hand_checked():
    """14 x 14 grid, centred coordinates. Linf: squares of 4, 16, 36, 64, 100, 144, 196 patches; L1:
    diamonds of 4 * d(d+1)/2 patches, so the target int(196 * 0.5) = 98 lies between 84 and 112,
    exactly in the middle: the smaller wins."""
    linf = centre_distances(14, "linf", "centred")
    assert [int((linf <= threshold_for(linf, t)).sum()) for t in (137, 98, 96, 67)] == [144, 100, 100, 64]
    l1 = centre_distances(14, "l1", "centred")
    assert int((l1 <= threshold_for(l1, 98)).sum()) == 84
    # Haurum's float32 grid agrees on the square; its rounding splits L1 rings (the comparison table).
    haurum = centre_distances(14, "linf")
    assert torch.equal(haurum <= threshold_for(haurum, 98), linf <= 4.5)


def test_spatial_multi_layer_keeps_nested_central_squares_and_gflops_follow(tmp_path):
    model = deit_like()
    _, record = run_method(
        model,
        "spatial",
        0.7,
        tmp_path,
        "schedule=multi",
        "method.pattern=linf",
        "method.grid=centred",
        trace=True,
    )
    assert record["blocks"] == [2, 5, 8] and model.reducer.counts == [144, 100, 64]
    x = torch.randn(2, 3, 224, 224)
    got = count_macs(model, x[:1]) / 1e9
    expected = analytic_gflops(model, [197] * 3 + [145] * 3 + [101] * 3 + [65] * 3)
    assert got == pytest.approx(expected, abs=1e-12)
    model(x)
    kept = model.last_trace[-1][1][0, 1:, 1:].float().argmax(dim=-1)
    rows, cols = kept // 14, kept % 14
    assert rows.min() == 3 and rows.max() == 10 and cols.min() == 3 and cols.max() == 10  # the central 8 x 8
    assert kept.tolist() == sorted(kept.tolist())  # original order, the same for every image


def test_kmedoids_hand_checked_medoids():
    """1-D points 0, 1, 10, 11, 12 weighted 5, 1, 4, 1, 1; k = 2. Initial medoids: the heaviest, 0 and
    10. Costs w_j * sum_i |x_j - x_i|: 170, 31, 88, 23, 26. Clusters {0, 1} and {10, 11, 12} pick
    their cheapest members, 1 and 11; the assignment does not change after that."""
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0], [12.0]])[None]
    weight = torch.tensor([[5.0, 1.0, 4.0, 1.0, 1.0]])
    medoids, assignment = k_medoids(x, weight, 2, iterations=3)
    assert medoids.tolist() == [[1, 3]] and assignment.tolist() == [[0, 0, 1, 1, 1]]
    medoids, _ = k_medoids(x, weight, 2, iterations=0)
    assert medoids.tolist() == [[0, 2]]  # no iteration: the initial medoids
    # The reference's cost sums over all patches: for {0, 1, 3} beside a far 100 (sums 104, 102, 102)
    # it picks 3 (0.985 * 102 < 102 < 0.98 * 104), where a within-cluster medoid would be 1 and the
    # lightest token 0.
    x = torch.tensor([[0.0], [1.0], [3.0], [100.0]])[None]
    medoids, assignment = k_medoids(x, torch.tensor([[0.98, 1.0, 0.985, 5.0]]), 2, iterations=3)
    assert medoids.tolist() == [[3, 2]] and assignment.tolist() == [[1, 1, 1, 0]]


def test_dpcknn_hand_checked_centres_and_merge():
    """1-D points 0, 0.1, 0.3, 5, 5.2, k = 2 neighbours (the token itself and its nearest): densities
    e^-0.005 for the first two, e^-0.02 for the rest; the noise makes 0.1 and 5 the denser of each
    tie. delta: 5.2 (the densest: the largest distance) for 0.1, 4.9 for 5, <= 0.2 elsewhere, so
    the centres are 0.1 then 5; clusters {0, 0.1, 0.3} and {5, 5.2}, averaged."""
    x = torch.tensor([[0.0], [0.1], [0.3], [5.0], [5.2]], dtype=torch.float64)[None]
    noise = torch.tensor([[0.0, 1e-6, 0.0, 2e-6, 0.0]], dtype=torch.float64)
    centres, assignment = dpc_knn(x, 2, 2, noise)
    assert centres.tolist() == [[1, 3]] and assignment.tolist() == [[0, 0, 0, 1, 1]]


def test_clustering_methods_count_the_distance_matrix_and_partition_the_patches(tmp_path):
    """After block 2 at K = 0.5: 98 cluster tokens, plus 196^2 * D multiply-adds for the distances."""
    for method in ("kmedoids", "dpcknn"):
        model = deit_like()
        run_method(model, method, 0.5, tmp_path, trace=True)
        x = torch.randn(2, 3, 224, 224)
        got = count_macs(model, x[:1]) / 1e9
        expected = analytic_gflops(model, [197] * 3 + [99] * 9) + 196 * 196 * 48 / 1e9
        assert got == pytest.approx(expected, abs=1e-12), method
        model(x)
        source = model.last_trace[-1][1][:, 1:, 1:]
        assert source.shape[1] == 98
        assert torch.equal(source.sum(dim=1), torch.ones(2, 196, dtype=torch.long))  # a partition


def test_ats_sampling_hand_checked():
    """Points for int(n0 * rho) = 3: (2i+1)/8 = 0.125, 0.375, 0.625. Scores [0.5, 0.1, 0.1, 0.3] (cdf
    0.5, 0.6, 0.7, 1) sample tokens 0, 0, 1: two distinct; [0.1, 0.2, 0.3, 0.4] (cdf 0.1, 0.3, 0.6, 1)
    sample 0, 1, 2. The batch is padded to 3 tokens; the first row's third is a placeholder."""
    points = sample_points(3)
    torch.testing.assert_close(points, torch.tensor([0.125, 0.375, 0.625]))
    assert len(sample_points(2)) == 3  # Haurum's arange keeps its end point here (float rounding)
    score = torch.tensor([[0.5, 0.1, 0.1, 0.3], [0.1, 0.2, 0.3, 0.4]])
    samples = inverse_transform_sample(score, points)
    assert samples.tolist() == [[0, 0, 1], [0, 1, 2]]
    idx, real = unique_padded(samples, 4)
    assert idx.tolist() == [[0, 1, 0], [0, 1, 2]] and real.tolist() == [[True, True, False], [True] * 3]


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_ats_placeholders_change_no_output_batch_equals_one_by_one(pool, tmp_path):
    """Images keep different counts; padded together, each gives its batch-1 logits."""
    model = deit_like()
    model.global_pool = pool
    with torch.no_grad():  # sharper attention: samples coincide, counts differ between images
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10.0)
    run_method(model, "ats", 0.7, tmp_path, "schedule=multi")
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = model(x)
        assert model.last_tokens.size is not None and bool((model.last_tokens.size == 0).any())
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_ats_gflops_follow_the_kept_count_at_batch_one(tmp_path):
    model = deit_like()
    run_method(model, "ats", 0.5, tmp_path, trace=True)  # inside block 2, at most 98 (+1) samples
    x = torch.randn(1, 3, 224, 224)
    got = count_macs(model, x) / 1e9
    n = model.last_tokens.x.shape[1]
    assert n - 1 <= model.reducer.bound_tokens()[0]
    dim, hidden = 48, 96
    expected = (
        analytic_gflops(model, [197] * 3 + [n] * 9)
        - (analytic.mlp_part(197, dim, hidden) - analytic.mlp_part(n, dim, hidden)) / 1e9
    )
    assert got == pytest.approx(expected, abs=1e-12)


def test_ats_gflops_of_an_evaluation_are_the_mean_over_held_out_images(tmp_path):
    """Images keep different counts, so one image's GFLOPs would stand for none: the record has
    the mean of the per-image counts (the paper's validation-set average), with min and max."""
    from torch.utils.data import DataLoader, TensorDataset

    from tnt_lightning.measure import mean_gflops
    from tnt_lightning.tasks.evaluate import first_images

    model = deit_like()
    with torch.no_grad():  # sharper attention: samples coincide, counts differ between images
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10.0)
    run_method(model, "ats", 0.5, tmp_path)
    assert model.reducer.image_dependent_cost
    images = torch.randn(7, 3, 224, 224, generator=torch.Generator().manual_seed(5))

    class Held:
        def test_dataloader(self):
            return DataLoader(TensorDataset(images, torch.zeros(7, dtype=torch.long)), batch_size=3)

    picked = list(first_images(Held(), 5))
    assert len(picked) == 5 and all(torch.equal(a, b) for a, b in zip(picked, images[:5], strict=True))
    each = [count_macs(model, image[None]) / 1e9 for image in picked]
    assert len(set(each)) > 1, "the test needs images that keep different counts"
    counted = mean_gflops(model, picked)
    assert counted["mean"] == pytest.approx(sum(each) / 5, abs=1e-12)
    assert (counted["min"], counted["max"], counted["images"]) == (min(each), max(each), 5)


@pytest.mark.parametrize("method", ["spatial", "kmedoids", "dpcknn", "ats", "patchmerger", "sinkhorn", "sit"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_new_methods_keep_every_prefix_token_first_and_count_only_patches(method, prefix, tmp_path):
    model = tiny_vit(prefix=prefix, depth=6, img=64, patch=8)  # 64 patches
    if method == "ats" and prefix == 0:
        with pytest.raises(ReductionError, match="no CLS token"):
            run_method(model, method, 0.5, tmp_path)
        return
    run_method(model, method, 0.5, tmp_path, "schedule.blocks=[1]", trace=True)
    model(torch.randn(2, 3, 64, 64))
    tokens, source = model.last_tokens, model.last_trace[-1][1]
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix, dtype=torch.bool).expand(2, -1, -1))
    assert not source[:, prefix:, :prefix].any()  # no patch token stands for a prefix token
    if method == "ats":
        assert tokens.n <= model.reducer.bound_tokens()[0]
    else:
        assert tokens.n == model.reducer.counts[0] == (32 if method != "spatial" else 24)


def test_token_maps_of_the_new_methods(tmp_path):
    """Spatial greys the same outer ring in every image; a clustering step gives every patch an owner
    (its cluster); ATS's placeholders own no patch."""
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    model = deit_like()
    run_method(model, "spatial", 0.5, tmp_path, "method.pattern=linf", trace=True)
    model(x)
    owners = patch_owners(model.last_trace[-1][1], 1)
    assert ((owners >= 0).sum(axis=1) == 100).all() and (owners == owners[:1]).all()
    for method in ("kmedoids", "dpcknn"):
        model = deit_like()
        run_method(model, method, 0.5, tmp_path, trace=True)
        model(x)
        owners = patch_owners(model.last_trace[-1][1], 1)
        assert (owners >= 0).all() and all(len(set(row)) == 98 for row in owners.tolist())
    model = deit_like()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10.0)
    run_method(model, "ats", 0.7, tmp_path, trace=True)
    model(x)
    owners = patch_owners(model.last_trace[-1][1], 1)
    kept = (model.last_tokens.size[:, 1:, 0] > 0).sum(dim=1) if model.last_tokens.size is not None else None
    assert kept is not None and ((owners >= 0).sum(axis=1) == kept.numpy()).all()


# -- learned merging: PatchMerger, Sinkhorn, SiT ---------------------------------------------------

LEARNED_MERGING = ["patchmerger", "sinkhorn", "sit"]


def stage_shapes(method: str, outputs: int, dim: int = 48) -> dict[str, tuple[int, ...]]:
    if method == "patchmerger":
        return {"norm.weight": (dim,), "norm.bias": (dim,), "queries": (outputs, dim)}
    if method == "sinkhorn":
        return {"v": (outputs, dim)}
    half = dim // 2
    return {
        "weight.0.weight": (dim,),
        "weight.0.bias": (dim,),
        "weight.1.weight": (half, dim),
        "weight.1.bias": (half,),
        "weight.3.weight": (outputs, half),
        "weight.3.bias": (outputs,),
        "scale": (1, 1, 1),
    }


@pytest.mark.parametrize("method", LEARNED_MERGING)
def test_learned_merging_outputs_int_n0_rho_j_tokens_per_stage(method, tmp_path):
    """Haurum's rule: stage j outputs int(196 * 0.7 ** (j+1)) = 137, 96, 67 tokens after blocks 2, 5, 8;
    single-layer int(196 * 0.5) = 98 after block 2. Each stage's parameters are sized by its count."""
    model = deit_like()
    _, record = run_method(model, method, 0.7, tmp_path, "schedule=multi", trace=True)
    reducer = model.reducer
    assert reducer.blocks == [2, 5, 8] and reducer.counts == [137, 96, 67]
    assert record["keep_ratios"] == pytest.approx([0.7, 0.49, 0.343])
    model(torch.randn(2, 3, 224, 224))
    assert [s.shape[1] - 1 for _, s in model.last_trace] == [137, 96, 67]
    assert model.last_tokens.n == 67
    for j, outputs in enumerate(reducer.counts):
        got = {n: tuple(p.shape) for n, p in reducer.cluster_layers[j].named_parameters()}
        assert got == stage_shapes(method, outputs)
    model = deit_like()
    run_method(model, method, 0.5, tmp_path)
    assert model.reducer.blocks == [2] and model.reducer.counts == [98]
    model(torch.randn(1, 3, 224, 224))
    assert model.last_tokens.x.shape[1] == 1 + 98


@pytest.mark.parametrize("method", LEARNED_MERGING)
def test_learned_merging_gflops_count_the_merge(method, tmp_path):
    """After block 2 at K = 0.5 (n = 196 -> M = 98, D = 48): the blocks on 197 then 99 tokens, plus
    PatchMerger LN 5nD + scores MnD + merge MnD; Sinkhorn scores + merge; SiT LN + MLP nD(D/2) +
    n(D/2)M + merge."""
    n, m, d = 196, 98, 48
    extra = {
        "patchmerger": 5 * n * d + 2 * m * n * d,
        "sinkhorn": 2 * m * n * d,
        "sit": 5 * n * d + n * d * (d // 2) + n * (d // 2) * m + m * n * d,
    }[method]
    model = deit_like()
    run_method(model, method, 0.5, tmp_path)
    got = count_macs(model, torch.randn(1, 3, 224, 224)) / 1e9
    assert got == pytest.approx(analytic_gflops(model, [197] * 3 + [99] * 9) + extra / 1e9, abs=1e-12)


def test_sinkhorn_assignment_hand_checked():
    """Zero scores, M = 2 centres, n = 3 patches: u = -log 5 - log 3, v = log(3/2), so every entry of
    (plan * 5) is 1/2. Random scores: after the last (column) step every patch's column sums to 1,
    and the number of steps matters (the plan has not converged after 1)."""
    w = sinkhorn_assignment(torch.zeros(1, 2, 3, dtype=torch.float64), eps=1.0, iterations=3)
    torch.testing.assert_close(w, torch.full((1, 2, 3), 0.5, dtype=torch.float64))
    scores = torch.randn(2, 5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w3 = sinkhorn_assignment(scores, eps=1.0, iterations=3)
    torch.testing.assert_close(w3.sum(dim=1), torch.ones(2, 9, dtype=torch.float64))
    assert not torch.allclose(w3, sinkhorn_assignment(scores, eps=1.0, iterations=1))
    assert not torch.allclose(w3, sinkhorn_assignment(scores, eps=0.5, iterations=3))


def test_sinkhorn_merges_the_normalised_patches_and_projects_its_centres_when_training():
    stage = SinkhornStage(4, 2, eps=1.0, iterations=3).double()
    with torch.no_grad():
        stage.v.mul_(3.0)
    raw = stage.v.detach().clone()
    x = torch.randn(1, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stage.eval()
    merged, w = stage(x)
    assert torch.equal(stage.v.detach(), raw)  # evaluation leaves the parameter alone
    torch.testing.assert_close(merged, w @ F.normalize(x, dim=-1))
    unit = F.normalize(raw, dim=-1)
    torch.testing.assert_close(w, sinkhorn_assignment(unit @ F.normalize(x, dim=-1).transpose(1, 2), 1.0, 3))
    stage.train()
    stage(x)
    torch.testing.assert_close(stage.v.detach(), unit)  # the reference's in-place projection


def test_patchmerger_and_sit_average_uniformly_when_their_scores_are_flat():
    """Zero queries (PatchMerger) or a zero last layer (SiT): a softmax over the patches gives every
    output the mean of its inputs, of the LayerNorm-ed patches for PatchMerger, the raw ones for SiT."""
    x = torch.randn(2, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    merger = PatchMergerStage(8, 3, scaled=False).double()
    sit = SlimmingStage(8, 3, hidden_ratio=0.5).double()
    with torch.no_grad():
        merger.queries.zero_()
        sit.weight[3].weight.zero_()
        sit.weight[3].bias.zero_()
    merged, w = merger(x)
    torch.testing.assert_close(w, torch.full((2, 3, 6), 1 / 6, dtype=torch.float64))
    normed = F.layer_norm(x, (8,), eps=1e-5)
    torch.testing.assert_close(merged, normed.mean(dim=1, keepdim=True).expand(-1, 3, -1))
    merged, w = sit(x)
    torch.testing.assert_close(merged, x.mean(dim=1, keepdim=True).expand(-1, 3, -1))
    g = torch.Generator().manual_seed(3)
    for stage in (merger, sit):
        with torch.no_grad():
            for p in stage.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        _, w = stage(x)
        torch.testing.assert_close(w.sum(dim=-1), torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("method", LEARNED_MERGING)
def test_only_the_merging_stages_train(method, tmp_path):
    """The Lightning module freezes the backbone; the loss reaches every parameter of every stage."""
    model = deit_like()
    run_method(model, method, 0.7, tmp_path, "schedule=multi")
    module = TokenReductionModule(model, 10, OptimConfig(lr=1e-3))
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {f"reducer.{n}" for n, _ in model.reducer.named_parameters()}
    assert all(n.startswith("reducer.cluster_layers.") for n in trainable)
    model.train()
    out = model.reducer.training_loss(model, torch.randn(2, 3, 224, 224), torch.tensor([1, 3]), 0.1)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
        if p.grad is not None:
            assert bool(p.grad.abs().sum() > 0), name


@pytest.mark.parametrize("method", LEARNED_MERGING)
def test_learned_merging_token_maps_give_every_patch_one_owner(method, tmp_path):
    """Every patch belongs to the output it weighs most (argmax over outputs, Haurum's hard map)."""
    model = deit_like()
    run_method(model, method, 0.5, tmp_path, trace=True)
    model(torch.randn(2, 3, 224, 224))
    source = model.last_trace[-1][1]
    assert torch.equal(source[:, 1:, 1:].sum(dim=1), torch.ones(2, 196, dtype=torch.long))
    owners = patch_owners(source, 1)
    assert (owners >= 0).all() and (owners < 98).all()


def test_learned_merging_refuses_bad_options_and_other_patch_grids(tmp_path):
    model = deit_like()
    with pytest.raises(ReductionError, match="method.eps=0"):
        run_method(model, "sinkhorn", 0.5, tmp_path, "method.eps=0")
    with pytest.raises(ReductionError, match="keep ratios"):
        run_method(deit_like(), "patchmerger", 0.001, tmp_path)
    run_method(model, "patchmerger", 0.5, tmp_path)
    with pytest.raises(ReductionError, match="built for 196 patches"):
        apply_reducer(tiny_vit(depth=12, img=64, patch=8), model.reducer)


@pytest.mark.slow
@pytest.mark.parametrize("method", LEARNED_MERGING)
def test_learned_merging_trains_through_run_py(method, default_run, tmp_path):
    """``task=train`` on the tiny setup (vit_mnist, one epoch): the trained file holds the stages only."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "backbones").symlink_to(default_run[0] / "cache" / "backbones")
    args = ["task=train", f"method={method}", "data.train_overrides.epochs=1", "logger=csv", *SHORT_PRETRAIN]
    proc = run_py([*args, f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trained,) = (tmp_path / "cache" / "methods").rglob("trained.pth")
    state = torch.load(trained, map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(k.startswith("cluster_layers.") for k in state)
