"""Content-aware patch dropout (model.pretrain.patch_drop) of the embedded study's backbones: the
kept counts and sets it promises, and a pretraining that uses it caches a plain timm ViT."""

from __future__ import annotations

import pytest
import torch

from tnt_lightning.engine import backbone_info
from tnt_lightning.models import BackboneSpec, create_model
from tnt_lightning.models.patch_dropout import ContentPatchDropout

GRID = 4  # 4 x 4 patches of 2 x 2 pixels


def _images(batch: int = 3) -> torch.Tensor:
    """Flat canvases with content (a non-flat patch) in the first row of patches only."""
    images = torch.zeros(batch, 1, 2 * GRID, 2 * GRID)
    images[:, :, 0, ::2] = 1.0  # one bright pixel in each patch of row 0
    return images


def _tokens(batch: int = 3) -> torch.Tensor:
    """A CLS token (value -1) and the 16 patch tokens, each holding its own index."""
    patches = torch.arange(GRID * GRID, dtype=torch.float).expand(batch, -1)
    return torch.cat([torch.full((batch, 1), -1.0), patches], 1).unsqueeze(-1)


def _kept(drop: ContentPatchDropout, batch: int = 3) -> torch.Tensor:
    drop.observe(_images(batch))
    return drop(_tokens(batch))[..., 0]


def test_content_first_keeps_every_patch_with_content_and_the_prefix_token():
    torch.manual_seed(0)
    drop = ContentPatchDropout(patch_size=2, keep=(0.5, 0.5), content_first=1.0).train()
    kept = _kept(drop)
    assert kept.shape == (3, 1 + 8)
    assert (kept[:, 0] == -1).all()
    for row in kept[:, 1:]:
        assert set(range(GRID)) <= set(row.long().tolist())  # row 0's patches: 0..3
        assert row.tolist() == sorted(row.tolist())  # kept in token order


def test_the_kept_share_is_drawn_in_its_range_and_uniform_steps_ignore_content():
    torch.manual_seed(0)
    drop = ContentPatchDropout(patch_size=2, keep=(0.25, 0.75), content_first=0.0).train()
    counts, content_share = set(), []
    for _ in range(200):
        kept = _kept(drop)[:, 1:]
        counts.add(kept.shape[1])
        content_share.append((kept < GRID).float().mean().item())
    assert min(counts) >= 4 and max(counts) <= 12 and len(counts) > 5
    assert abs(sum(content_share) / len(content_share) - 0.25) < 0.05  # as uniform as row 0's share


def test_evaluation_keeps_every_token_and_a_forward_without_observe_fails():
    drop = ContentPatchDropout(patch_size=2).eval()
    assert torch.equal(drop(_tokens()), _tokens())
    with pytest.raises(RuntimeError, match="observe"):
        drop.train()(_tokens())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"keep": (0.0, 0.5)}, "keep"), ({"keep": (0.8, 0.5)}, "keep"), ({"content_first": 2}, "content_first")],
)
def test_bad_settings_fail_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContentPatchDropout(patch_size=2, **kwargs)


@pytest.mark.parametrize(
    ("patch_drop", "match"), [({"kep": [0.2, 0.5]}, "unknown keys.*kep"), ({"keep": [0.9, 0.2]}, "keep")]
)
def test_a_bad_patch_drop_recipe_fails_when_the_model_config_is_read(patch_drop, match):
    with pytest.raises(ValueError, match=f"model.pretrain.patch_drop.*{match}"):
        BackboneSpec(name="m", arch={"patch_size": 4}, weights="random", pretrain={"patch_drop": patch_drop})


def test_a_pretraining_with_patch_dropout_trains_on_fewer_tokens_and_caches_a_plain_vit(tmp_path):
    from hydra.utils import instantiate

    from helpers import compose_config
    from tnt_lightning.tasks.common import pretrain_fn

    cfg = compose_config(
        [
            "model.pretrain.epochs=1",
            "+trainer.limit_train_batches=2",
            "+model.pretrain.patch_drop={keep: [0.25, 0.25], content_first: 1.0}",
        ],
        tmp_path,
    )
    spec: BackboneSpec = instantiate(cfg.model)
    model = create_model(spec)
    seen: list[int] = []

    def count_tokens(_, args) -> None:
        if model.training:
            seen.append(args[0].shape[1])

    model.blocks[0].register_forward_pre_hook(count_tokens)
    pretrain_fn(cfg)(model, spec)
    patches = backbone_info(model).num_patches
    assert seen and set(seen) == {model.num_prefix_tokens + round(0.25 * patches)}
    assert isinstance(model.patch_drop, torch.nn.Identity) and not model._forward_pre_hooks
    create_model(spec).load_state_dict(model.state_dict())  # the engine accepts the cached model
