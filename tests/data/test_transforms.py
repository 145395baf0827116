"""The training transforms of image-folder data, over real-looking images, at every RandAugment level.

A Pillow or timm release that breaks an augmentation op fails here rather than a few steps into a
user's training (Pillow 13 rejects the 0-bit posterize that RandAugment m9-mstd0.5 reaches at 10).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment

from tnt_lightning.data import deit_train_transform, resolve_preprocessing
from tnt_lightning.data.transforms import AUGMENTATIONS, posterize_any_bits, train_transform


def photo_like(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth gradients, an edge and sensor noise: the statistics ops like equalize/solarize see."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 90 + 80 * np.sin(xx / w * 3.0 + seed) * np.cos(yy / h * 2.0)
    base[: h // 2, w // 3 :] += 60
    rgb = np.stack([base, base * 0.8 + 30, 255 - base], axis=-1) + rng.normal(0, 8, (h, w, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    return image.convert(mode)


IMAGES = [
    photo_like("RGB", (500, 375), 0),
    photo_like("RGB", (64, 96), 1),
    photo_like("L", (120, 80), 2).convert("RGB"),
    photo_like("CMYK", (200, 150), 3).convert("RGB"),
    photo_like("P", (90, 90), 4).convert("RGB"),
]


def rand_augment(transform) -> RandAugment:
    (found,) = [t for t in transform.transforms if isinstance(t, RandAugment)]
    return found


def test_deit_train_transform_is_the_deit_recipe():
    ra = rand_augment(deit_train_transform(224))
    assert ra.num_layers == 2 and len(ra.ops) == 15
    assert {op.magnitude for op in ra.ops} == {9} and {op.magnitude_std for op in ra.ops} == {0.5}


@pytest.mark.parametrize("magnitude", range(11))
def test_every_rand_augment_op_runs_at_every_magnitude(magnitude):
    """Each op of the recipe, forced on (p=1) at a fixed magnitude 0..10, over every test image."""
    for op in rand_augment(deit_train_transform(224)).ops:
        forced = copy.copy(op)
        forced.prob, forced.magnitude, forced.magnitude_std = 1.0, magnitude, 0.0
        for image in IMAGES:
            out = forced(image)
            assert isinstance(out, Image.Image) and out.size == image.size, (op.name, magnitude)


def test_zero_bit_posterize_gives_black_as_older_pillow_did():
    image = IMAGES[0]
    black = posterize_any_bits(image, 0)
    assert black.mode == image.mode and np.asarray(black).max() == 0
    assert posterize_any_bits(image, 8) is image
    assert np.array_equal(np.asarray(posterize_any_bits(image, 2)), np.asarray(image) & 0b11000000)


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_whole_train_transform_over_many_draws(augment):
    """The composed transform, applied repeatedly (magnitudes drawn around 9, clipped at 10)."""
    torch.manual_seed(0)
    given = {
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
    }
    transform = train_transform(augment, 32, resolve_preprocessing({"source": "given", **given}))
    for _ in range(40):
        for image in IMAGES:
            x = transform(image)
            assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
