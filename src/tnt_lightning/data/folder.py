"""ImageNet-1K and any other folder dataset in the same layout (``<root>/<split>/<class>/<image>``)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ..config import UserError
from .base import ClassificationDataModule

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID = re.compile(r"^n\d{8}$")


class DataLayoutError(UserError, ValueError):
    """The data folder is missing, laid out wrongly, or has an empty split."""


def load_rgb(path: str) -> Image.Image:
    """Decode any image file to RGB.

    PIL identifies the format from the file's bytes, not its name, so a PNG saved as ``.JPEG``
    (there are some in ImageNet) decodes; CMYK, greyscale and palette images become RGB.
    """
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")


def deit_eval_transform(
    image_size: int = 224, crop_pct: float = 0.875, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
) -> transforms.Compose:
    """DeiT's evaluation transform: bicubic resize to 256 (= 224 / 0.875), centre crop 224, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(int(image_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def deit_train_transform(image_size: int = 224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """DeiT's training augmentation through timm (RandAugment m9, colour jitter 0.3, random erasing 0.25)."""
    return create_transform(
        input_size=image_size,
        is_training=True,
        color_jitter=0.3,
        auto_augment="rand-m9-mstd0.5-inc1",
        interpolation="bicubic",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        mean=mean,
        std=std,
    )


class ImageFolderDataModule(ClassificationDataModule):
    """``<root>/train`` and ``<root>/val``, one sub-folder per class.

    With ``imagenet: true`` the layout must be ImageNet-1K's: 1000 WordNet-id folders per split.
    """

    def __init__(
        self,
        root: str,
        name: str = "imagefolder",
        imagenet: bool = False,
        train_split: str = "train",
        val_split: str = "val",
        image_size: int = 224,
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool | None = None,
        train_overrides: dict | None = None,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, pin_memory, train_overrides)
        if root is None or str(root) in ("", "???"):
            raise DataLayoutError(
                f"data={name} needs data.root=/path/to/dataset (with {train_split}/ and {val_split}/)"
            )
        self.root = Path(root).expanduser()
        self.imagenet = imagenet
        self.splits = {"fit": train_split, "validate": val_split, "test": val_split}
        self.image_size, self.crop_pct = image_size, crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self._classes: list[str] | None = None
        self._datasets: dict[str, ImageFolder] = {}

    @property
    def num_classes(self) -> int:
        if self._classes is None:
            self._classes = self._check_split(self.splits["test"])
        return len(self._classes)

    def check(self, stages: tuple[str, ...]) -> None:
        if not self.root.is_dir():
            raise DataLayoutError(f"data.root={str(self.root)!r} does not exist or is not a folder")
        found = {}
        for stage in stages:
            split = self.splits[stage]
            found[split] = self._check_split(split)
        names = list(found.values())
        if len(names) > 1 and any(n != names[0] for n in names):
            raise DataLayoutError(f"the splits {list(found)} under {self.root} have different class folders")
        if names:
            self._classes = names[0]

    def _check_split(self, split: str) -> list[str]:
        folder = self.root / split
        if not folder.is_dir():
            present = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
            raise DataLayoutError(
                f"expected a split folder {str(folder)!r}; {str(self.root)!r} contains {present[:10]}"
            )
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        loose = [
            e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not classes:
            raise DataLayoutError(
                f"{str(folder)!r} has no class sub-folders (found {len(loose)} loose image files); expected "
                f"one folder per class, e.g. {split}/n01440764/*.JPEG (ImageNet's val needs the usual "
                f"valprep step)"
            )
        if self.imagenet:
            bad = [c for c in classes if not WNID.match(c)]
            if len(classes) != 1000 or bad:
                raise DataLayoutError(
                    f"{str(folder)!r} is not ImageNet-1K: expected 1000 WordNet-id folders (n01440764 ...), "
                    f"found {len(classes)} folders" + (f", e.g. non-WordNet names {bad[:3]}" if bad else "")
                )
        empty = [c for c in classes if not _has_image(folder / c)]
        if len(empty) == len(classes):
            raise DataLayoutError(
                f"the split {str(folder)!r} is empty: none of its {len(classes)} class folders holds an image"
            )
        if empty:
            raise DataLayoutError(
                f"{len(empty)} class folders of {str(folder)!r} hold no image, e.g. {empty[:3]}"
            )
        return classes

    def setup(self, stage: str | None = None) -> None:
        for s in ("fit", "test") if stage is None else (stage,):
            split = self.splits.get(s, self.splits["test"])
            if split in self._datasets:
                continue
            train = s == "fit"
            transform = (
                deit_train_transform(self.image_size, self.mean, self.std)
                if train
                else deit_eval_transform(self.image_size, self.crop_pct, self.mean, self.std)
            )
            self._datasets[split] = ImageFolder(str(self.root / split), transform=transform, loader=load_rgb)
        if stage == "fit":
            self.setup("validate")

    def train_dataloader(self):
        return self._loader(self._datasets[self.splits["fit"]], train=True)

    def val_dataloader(self):
        return self._loader(self._datasets[self.splits["validate"]], train=False)

    def test_dataloader(self):
        return self._loader(self._datasets[self.splits["test"]], train=False)


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
