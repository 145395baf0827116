"""Haurum et al.'s training-free baselines, timm backbones in general, and two fixes of existing methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config, tiny_vit
from tnt_lightning.engine import Tokens, backbone_info
from tnt_lightning.methods import TNT, build_reducer
from tnt_lightning.models import BackboneSpec


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
