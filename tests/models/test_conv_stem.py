"""The conv stem (model.arch.embed_layer=conv_stem) of the embedded study's backbones: the same
token grid as a linear patch embedding, run by the engine as any timm ViT, and its batch-norm
statistics left as pretrained while a method trains."""

from __future__ import annotations

import pytest
import torch

from tnt_lightning.engine import apply_reducer, backbone_info
from tnt_lightning.errors import ConfigError
from tnt_lightning.lit.optim import OptimConfig
from tnt_lightning.lit.reduction import TokenReductionModule
from tnt_lightning.methods.dynamicvit import DynamicViT
from tnt_lightning.models import BackboneSpec, create_model
from tnt_lightning.models.conv_stem import ConvStemPatchEmbed

ARCH = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0, init_values=0.1)


def _spec(**arch) -> BackboneSpec:
    return BackboneSpec(
        name="stem",
        arch={**ARCH, "embed_layer": "conv_stem", **arch},
        weights="random",
        num_classes=10,
        input_size=(1, 56, 56),
    )


def test_the_stem_ends_on_the_patch_grid_of_the_linear_embedding():
    model = create_model(_spec())
    assert isinstance(model.patch_embed, ConvStemPatchEmbed)
    assert model.patch_embed.grid_size == (14, 14) and model.patch_embed.num_patches == 196
    tokens = model.patch_embed(torch.randn(2, 1, 56, 56))
    assert tokens.shape == (2, 196, 32)
    strides = [m.stride[0] for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert strides == [1, 2, 1, 2, 1]
    assert model(torch.randn(2, 1, 56, 56)).shape == (2, 10)


def test_an_unknown_embed_layer_or_patch_size_fails_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"embed_layer='convstem'.*\['patch', 'conv_stem'\]"):
        create_model(_spec(embed_layer="convstem"))
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        create_model(
            BackboneSpec(
                name="stem",
                arch={**ARCH, "patch_size": 7, "embed_layer": "conv_stem"},
                weights="random",
                num_classes=10,
                input_size=(1, 56, 56),
            )
        )


def test_a_methods_training_leaves_the_stems_batch_norm_statistics_as_pretrained():
    model = create_model(_spec())
    model.train()
    model(torch.randn(8, 1, 56, 56) * 3 + 1)  # pretrained statistics, away from the initial ones
    model.eval()
    bn = next(m for m in model.patch_embed.proj if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    apply_reducer(model, DynamicViT(backbone_info(model), [1], [0.5]))
    module = TokenReductionModule(model, 10, OptimConfig(lr=1e-3), backbone_lr_scale=0.01)
    module._set_modes()
    assert module.model.blocks[0].training and not bn.training
    x, y = torch.randn(4, 1, 56, 56), torch.arange(4)
    out = module.reducer.training_loss(module.model, x, y, 0.1, module.teacher)
    out.loss.backward()
    assert torch.equal(bn.running_mean, before)
