"""Haurum et al.'s training-free baselines, timm backbones in general, and two fixes of existing methods."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import compose_config, tiny_vit
from tnt_lightning.config import ConfigError
from tnt_lightning.engine import BackboneInfo, Tokens, apply_reducer, backbone_info
from tnt_lightning.measure import analytic, count_macs
from tnt_lightning.methods import TNT, build_reducer
from tnt_lightning.models import BackboneSpec, WeightsUnavailableError, backbones, create_model
from tnt_lightning.models.backbones import check_engine_support


def build(overrides: list[str], model, tmp_path):
    cfg = compose_config(overrides, tmp_path)
    pruning = BackboneSpec(name="probe", arch={"depth": 1}).pruning
    return build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, pruning, backbone_info(model))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tnt_multi_layer_importance_comes_from_the_cpu_generator_on_cuda():
    """On CUDA the importance is the CPU generator's draw (as the official ``rand(...).to(device)``)."""
    got, expected = tnt_pre_block_order("cuda")
    assert got == expected


# -- any timm VisionTransformer --------------------------------------------------------------------


def timm_spec(tmp_path, name: str, *overrides: str) -> BackboneSpec:
    return instantiate(compose_config(["model=timm", f"model.timm_name={name}", *overrides], tmp_path).model)


def analytic_gflops(model, tokens_per_block, final_tokens=None) -> float:
    """METHODS.md 9.2 for a timm ViT; mean-pooled models with fc_norm normalise one pooled vector."""
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
        1000,
        final_tokens=final_tokens,
    )
    return macs / 1e9


@pytest.mark.parametrize(
    "name,size,prefix",
    [
        ("vit_small_patch16_224", 224, 1),
        ("vit_base_patch16_224", 224, 1),
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
    reducer, record = build_reducer(cfg.method, cfg.schedule, 0.5, spec.pruning, backbone_info(model))
    assert record["blocks"] == [2]  # the paper's "after the 3rd of 12 blocks"
    apply_reducer(model, reducer, trace_sources=True)
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
    with pytest.raises(ConfigError, match=re.escape(reason)) as err:
        create_model(timm_spec(tmp_path, name))
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
