"""Image transforms for folder datasets: DeiT's eval and train recipes, and lighter ones for small data.

``data.augment`` chooses the training augmentation:

* ``deit``: the DeiT recipe through timm (RandAugment ``rand-m9-mstd0.5-inc1``, colour jitter 0.3,
  random erasing 0.25), as the paper's learned methods were trained on ImageNet;
* ``light``: random-resized crop and horizontal flip only, for small or low-resolution datasets;
* ``none``: the evaluation transform (resize, centre crop, normalise).

Mean, std and interpolation are the backbone's (:mod:`.preprocess`).
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import RandAugment
from torchvision import transforms

from .preprocess import Preprocessing

AUGMENTATIONS = ("deit", "light", "none")


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize that accepts 0 bits, as Pillow < 13 did (the result is a black image).

    timm's ``PosterizeIncreasing`` asks for 0 bits when RandAugment's magnitude reaches 10 (m9 with
    std 0.5 does, clipped at 10); Pillow 13 raises "bits must be between or equal to 1 and 8" there,
    which stopped DeiT-recipe training a few steps in. Pillow < 13 masked every bit away, giving
    black: the same lookup table is applied here, so training behaves as on the releases the
    official recipe ran with.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point([0] * 256 * len(img.getbands()))


def _robust_rand_augment(transform: transforms.Compose) -> transforms.Compose:
    """Swap the posterize function of every RandAugment op in ``transform`` for ``posterize_any_bits``."""
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_any_bits
    return transform


def deit_train_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
) -> transforms.Compose:
    """DeiT's training augmentation through timm (RandAugment m9, colour jitter 0.3, random erasing 0.25)."""
    transform = create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=0.3,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation=interpolation,
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
    )
    return _robust_rand_augment(transform)


def light_train_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic",
) -> transforms.Compose:
    """Random-resized crop (scale 0.35-1) and horizontal flip: enough for small, low-resolution data."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                image_size, scale=(0.35, 1.0), interpolation=transforms.InterpolationMode(interpolation)
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def train_transform(augment: str, image_size: int, preprocessing: Preprocessing) -> transforms.Compose:
    """The training transform ``data.augment`` names (one of ``AUGMENTATIONS``).

    Args:
        augment: ``deit``, ``light`` or ``none``.
        image_size: the side of the square crops.
        preprocessing: the backbone's normalisation and interpolation (and crop, for ``none``).

    Returns:
        The transform from a PIL image to a normalised tensor.
    """
    p = preprocessing
    if augment == "deit":
        return deit_train_transform(image_size, p.mean, p.std, p.interpolation)
    if augment == "light":
        return light_train_transform(image_size, p.mean, p.std, p.interpolation)
    if augment == "none":
        return p.eval_transform(image_size)
    raise ValueError(f"data.augment={augment!r} is not one of {list(AUGMENTATIONS)}")
