"""The cluttered MNIST builder (data=cluttered_mnist): deterministic, DeiT's 196-token layout, the
digit and its label intact, no clutter across the split, built once; and the study's configs."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from helpers import CONF
from tnt_lightning.data import ClutteredMNISTDataModule
from tnt_lightning.data.cluttered_mnist import CANVAS, DIGIT, build_split
from tnt_lightning.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist_digits, stratified_split
from tnt_lightning.models import create_model
from tnt_lightning.models.provider import pretrain_key


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist_digits()
    ink = ((images[:, 0] * MNIST_STD + MNIST_MEAN) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return ink, labels


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return ClutteredMNISTDataModule(train_copies=1, cache_dir=str(tmp_path_factory.mktemp("c"))).splits()


def _small(digits, seed: int, **kw):
    ink, labels = digits
    return build_split(ink, labels, torch.arange(0, 5000, 50), 2, 6, 8, seed, **kw)


def test_same_seed_same_tensors_other_seed_other_tensors(digits):
    a, b, c = _small(digits, 3), _small(digits, 3), _small(digits, 4)
    for key, value in a.as_dict().items():
        assert torch.equal(value, getattr(b, key)), key
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.clutter_index, c.clutter_index)


def test_layout_196_tokens_digit_inside_the_canvas_label_kept(digits):
    ink, labels = digits
    split = _small(digits, 0)
    assert split.images.shape == (200, CANVAS, CANVAS) and split.images.dtype == torch.uint8
    assert ((split.box >= 0) & (split.box <= CANVAS - DIGIT)).all()
    assert torch.equal(split.labels, labels[split.digit_index])
    for i in range(len(split.labels)):  # the whole digit is on the canvas where the box says
        y, x = split.box[i].tolist()
        assert (split.images[i, y : y + DIGIT, x : x + DIGIT] >= ink[split.digit_index[i]]).all()
    assert len(split.box.unique(dim=0)) > 100  # translated: positions vary
    assert (split.clutter_index != split.digit_index[:, None]).all()  # clutter from other digits
    spec = instantiate(_compose("model=vit_cmnist", "data=cluttered_mnist").model)
    tokens = create_model(spec).patch_embed(torch.zeros(1, 1, CANVAS, CANVAS))
    assert tokens.shape[1] == 196


def test_no_clutter_leaks_across_the_split(splits):
    _, labels = load_mnist_digits()
    train_idx, held_idx = stratified_split(labels, 400, 0)
    train, held = set(train_idx.tolist()), set(held_idx.tolist())
    for split, own in ((splits["train"], train), (splits["held_out"], held)):
        assert set(split.digit_index.tolist()) == own
        assert set(split.clutter_index.flatten().tolist()) <= own
    assert len(splits["held_out"].labels) == 1000 and len(splits["train"].labels) == 4000


def test_built_once_then_read_from_the_cache(tmp_path, monkeypatch):
    dm = ClutteredMNISTDataModule(train_copies=1, clutter=2, cache_dir=str(tmp_path))
    first = dm.splits()
    assert dm.cache_path().is_file() and dm.cache_path().parent == tmp_path / "data"

    def no_rebuild(self):
        raise AssertionError("built again although cached")

    monkeypatch.setattr(ClutteredMNISTDataModule, "build", no_rebuild)
    again = ClutteredMNISTDataModule(train_copies=1, clutter=2, cache_dir=str(tmp_path)).splits()
    assert torch.equal(first["held_out"].images, again["held_out"].images)
    other = ClutteredMNISTDataModule(train_copies=1, clutter=3, cache_dir=str(tmp_path))
    assert other.cache_path() != dm.cache_path()


def test_patch_kinds_mark_the_digits_inked_patches_clutter_and_blank(tmp_path):
    """The labels behind task=visualize's "patches kept by kind": digit patches lie in the digit's
    box and hold ink; blank ones hold none; without clutter every inked patch is the digit's."""
    dm = ClutteredMNISTDataModule(train_copies=1, cache_dir=str(tmp_path))
    kinds, split = dm.patch_kinds(), dm.splits()["held_out"]
    assert kinds.shape == (1000, 196)
    inked = split.images.view(1000, 14, 4, 14, 4).amax(dim=(2, 4)).flatten(1) >= 64
    assert torch.equal(kinds > 0, inked)
    for i in range(20):
        y, x = split.box[i].tolist()
        rows, cols = torch.nonzero(kinds[i].view(14, 14) == 2, as_tuple=True)
        assert len(rows) >= 3 and (rows * 4 + 3 >= y).all() and (rows * 4 < y + DIGIT).all()
        assert (cols * 4 + 3 >= x).all() and (cols * 4 < x + DIGIT).all()
    assert (kinds == 1).any()
    bare = ClutteredMNISTDataModule(train_copies=1, clutter=0, cache_dir=str(tmp_path)).patch_kinds()
    assert not (bare == 1).any() and (bare == 2).sum(1).min() >= 3


@pytest.mark.parametrize("value", [{"train_copies": 0}, {"clutter": -1}, {"clutter_size": 30}])
def test_bad_settings_fail_naming_the_key(value):
    (key,) = value
    with pytest.raises(ValueError, match=f"data.{key}"):
        ClutteredMNISTDataModule(**value)


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("model", ["vit_cmnist", "vit_cmnist_meanpool"])
def test_study_backbones_compose_with_the_paper_defaults(model):
    cfg = _compose(f"model={model}", "data=cluttered_mnist")
    spec = instantiate(cfg.model)
    assert spec.input_size == (1, CANVAS, CANVAS) and spec.arch["depth"] == 12
    assert spec.pruning.pre_similarity_tokens == 40
    assert spec.pretrain["data"]["_target_"] == cfg.data._target_


@pytest.mark.parametrize("sweep", ["cmnist_study", "cmnist_study_multi", "cmnist_study_meanpool"])
def test_study_sweeps_pretrain_one_backbone_per_seed_on_the_same_canvases(sweep):
    """Seed s runs on the backbone pretrained from seed s (the spread over seeds includes the
    backbone's), while every seed sees the same canvases."""
    specs = [instantiate(_compose(f"+sweep={sweep}", f"seed={seed}").model) for seed in (0, 1)]
    assert [spec.pretrain["seed"] for spec in specs] == [0, 1]
    assert pretrain_key(specs[0]) != pretrain_key(specs[1])
    assert specs[0].pretrain["data"] == specs[1].pretrain["data"]
