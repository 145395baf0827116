"""GFLOPs: exact fvcore-convention counts, checked against the closed-form formula (docs/methods/flops.md)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from timm.models.vision_transformer import VisionTransformer

from helpers import compose_config, tiny_vit
from tnt_lightning.engine.analytic import vit_macs
from tnt_lightning.measure import count_macs
from tnt_lightning.models import create_model, set_fused_attn

# The exact integers of docs/methods/flops.md#base-models, and the paper's printed GFLOPs.
PAPER_BACKBONES = [
    ("deit_tiny_distilled", 1_265_755_776, 1.27),
    ("deit_small_distilled", 4_633_644_288, 4.63),
    ("deit_base_distilled", 17_675_819_520, 17.68),
    ("vit_b16_meanpool", 9_166_869_504, 9.17),
]


@pytest.mark.parametrize("name,exact,paper", PAPER_BACKBONES, ids=[n for n, _, _ in PAPER_BACKBONES])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-attn", "unfused-attn"])
def test_paper_backbones_count_the_exact_integers(name, exact, paper, fused, tmp_path):
    spec = instantiate(compose_config([f"model={name}", f"model.fused_attn={fused}"], tmp_path).model)
    macs = count_macs(create_model(spec), torch.randn(1, 3, 224, 224))
    assert macs == exact
    assert round(macs / 1e9, 2) == paper


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("fused", [True, False])
def test_small_vits_match_the_closed_form(prefix, fused):
    model = tiny_vit(prefix=prefix, depth=3, dim=48, heads=4, img=32, patch=8, mlp_ratio=2.0, num_classes=7)
    set_fused_attn(model, fused)
    n = 16 + prefix
    expected = vit_macs(
        [n] * 3,
        dim=48,
        mlp_hidden=96,
        num_patches=16,
        patch_size=8,
        in_chans=3,
        num_classes=7,
        num_heads_out=2 if prefix == 2 else 1,
    )
    assert count_macs(model, torch.randn(1, 3, 32, 32)) == expected


def test_hand_computed_small_vit():
    """One block, 4 patches + CLS, D=8, MLP 16, 2 classes, 2x2 patches of a 1-channel 4x4 image."""
    model = VisionTransformer(
        img_size=4, patch_size=2, in_chans=1, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=2
    )
    n, d, m = 5, 8, 16
    by_hand = (
        4 * 8 * 1 * 2 * 2  # patch embedding: 4 patches x D x (C*p*p)
        + 5 * n * d
        + 3 * n * d * d
        + n * n * d
        + n * n * d
        + n * d * d  # LN1, qkv, QK^T, AV, proj
        + 5 * n * d
        + n * d * m
        + n * m * d  # LN2, fc1, fc2
        + 5 * n * d  # final LN
        + d * 2  # head
    )
    assert by_hand == 3_704  # 128 + 200 + 960 + 200 + 200 + 320 + 200 + 640 + 640 + 200 + 16
    assert count_macs(model, torch.randn(1, 1, 4, 4)) == by_hand


def _drop_after(block, keep: int):
    return block.register_forward_hook(lambda module, args, out: out[:, :keep])


def _mask_after(block, keep: int):
    def hook(module, args, out):
        mask = torch.zeros_like(out[..., :1])
        mask[:, :keep] = 1
        return out * mask

    return block.register_forward_hook(hook)


@pytest.mark.parametrize("fused", [True, False])
def test_tokens_dropped_mid_forward_are_counted(fused):
    model = tiny_vit(prefix=1, depth=4, dim=48, heads=4, img=32, patch=8)
    set_fused_attn(model, fused)
    _drop_after(model.blocks[1], keep=7)
    expected = vit_macs(
        [17, 17, 7, 7], dim=48, mlp_hidden=96, num_patches=16, patch_size=8, in_chans=3, num_classes=10
    )
    assert count_macs(model, torch.randn(1, 3, 32, 32)) == expected


def test_tokens_that_are_only_masked_show_no_saving():
    model = tiny_vit(prefix=1, depth=4)
    full = count_macs(model, torch.randn(1, 3, 32, 32))
    _mask_after(model.blocks[1], keep=7)
    assert count_macs(model, torch.randn(1, 3, 32, 32)) == full
