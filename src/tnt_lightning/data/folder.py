"""ImageNet-1K and any other folder dataset in the same layout (``<root>/<split>/<class>/<image>``)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate
from torchvision.datasets import ImageFolder

from ..errors import UserError
from ..results.content import EVAL_SPLIT_FALLBACKS, IMAGE_EXTENSIONS
from ..results.identity import PREPROCESS_KEYS
from .base import ClassificationDataModule
from .decoded import DecodedCache, DecodedSplit, whole_batch
from .preprocess import Preprocessing, resolve_preprocessing
from .transforms import AUGMENTATIONS, train_transform

log = logging.getLogger(__name__)

WNID = re.compile(r"^n\d{8}$")
BAD_IMAGE_POLICIES = ("fail", "skip")
# What a damaged or truncated file raises while PIL decodes it.
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataLayoutError(UserError, ValueError):
    """The data folder is missing, laid out wrongly, or has an empty split."""


class BadImageError(OSError):
    """An image file of the dataset cannot be decoded; the message names the file."""


def load_rgb(path: str, mode: str = "RGB") -> Image.Image:
    """Decode any image file to ``mode`` (RGB, or L for one-channel models).

    PIL identifies the format from the file's bytes, not its name, so a PNG saved as ``.JPEG``
    (there are some in ImageNet) decodes; CMYK, greyscale and palette images are converted.
    A file that cannot be decoded raises :class:`BadImageError` naming it.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert(mode)
    except DECODE_ERRORS as e:
        raise BadImageError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


class CheckedImageFolder(ImageFolder):
    """An ImageFolder whose unreadable images fail with their path, or are skipped and counted.

    Skipped samples come back as ``None`` and :func:`collate_decoded` drops them from the batch. The
    flags of skipped samples live in shared memory, so DataLoader workers' skips are counted too,
    each file once however many epochs meet it.
    """

    def __init__(self, root: str, transform: Any, mode: str, on_bad_image: str) -> None:
        super().__init__(root, transform=transform, loader=partial(load_rgb, mode=mode))
        self.on_bad_image = on_bad_image
        self._bad = multiprocessing.get_context().RawArray("b", len(self.samples))

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except BadImageError as e:
            if self.on_bad_image == "fail":
                raise BadImageError(f"{e} (data.on_bad_image=skip leaves such files out)") from e
            if not self._bad[index]:
                self._bad[index] = 1
                log.warning("skipping %s (data.on_bad_image=skip)", e)
            return None

    @property
    def bad_paths(self) -> list[str]:
        return [self.samples[i][0] for i, flag in enumerate(self._bad) if flag]


def collate_decoded(batch: list) -> Any:
    """Default collation of the samples that decoded (skipped ones are ``None``)."""
    kept = [sample for sample in batch if sample is not None]
    if not kept:
        raise BadImageError(f"none of the {len(batch)} images of a batch could be decoded (see the log)")
    return default_collate(kept)


class ImageFolderDataModule(ClassificationDataModule):
    """``<root>/<train_split>`` and ``<root>/<val_split>``, one sub-folder per class.

    ``val_split`` null (the default) takes the first of ``val``, ``validation``, ``test`` present,
    and says which. With ``imagenet: true`` the layout must be ImageNet-1K's: 1000 WordNet-id
    folders per split. ``channels`` and ``image_size`` are the data's (``input_size``): a backbone
    that follows the data is built for them, a fixed-size one must agree. ``preprocess`` holds the
    resolved values of ``data.preprocess`` (:func:`tnt_lightning.tasks.inputs.resolve_inputs` fills
    them in from the backbone); None is DeiT's recipe. ``content``: the image count and file-list
    fingerprint per split that the run's identity holds (:mod:`tnt_lightning.results.content`),
    checked against the images found. ``decoded_cache``: read the evaluation splits from a cache of
    their decoded centre crops under ``<cache_dir>/decoded/``, built by the first job that needs it
    (:mod:`tnt_lightning.data.decoded`); the batches are bitwise the same.
    """

    def __init__(
        self,
        root: str,
        name: str = "imagefolder",
        imagenet: bool = False,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        channels: int = 3,
        image_size: int = 224,
        preprocess: dict[str, Any] | None = None,
        augment: str = "deit",
        on_bad_image: str = "fail",
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool | None = None,
        train_overrides: dict | None = None,
        content: dict[str, Any] | None = None,
        decoded_cache: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, pin_memory, train_overrides)
        if root is None or str(root) in ("", "???"):
            raise DataLayoutError(
                f"data={name} needs data.root=/path/to/dataset (with {train_split}/ and val/)"
            )
        if augment not in AUGMENTATIONS:
            raise ValueError(f"data.augment={augment!r} is not one of {list(AUGMENTATIONS)}")
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.on_bad_image={on_bad_image!r} is not one of {list(BAD_IMAGE_POLICIES)}")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels!r} must be 1 (greyscale) or 3 (RGB)")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"data.image_size={image_size!r} must be a positive integer")
        self.root = Path(root).expanduser()
        self.imagenet = imagenet
        self.train_split = train_split
        self._val_split, self._test_split = val_split, test_split
        self.channels, self.image_size = channels, image_size
        self.augment, self.on_bad_image = augment, on_bad_image
        self.preprocessing = _given_preprocessing(preprocess).for_channels(channels)
        self.mean, self.std = self.preprocessing.mean, self.preprocessing.std
        self._classes: list[str] | None = None
        self._datasets: dict[str, CheckedImageFolder | DecodedSplit] = {}
        self.content = content or {}
        if not isinstance(decoded_cache, bool):
            raise ValueError(f"data.decoded_cache={decoded_cache!r} must be true or false")
        self.decoded_cache, self.cache_dir = decoded_cache, cache_dir

    @property
    def splits(self) -> dict[str, str]:
        """Folder name per Lightning stage; the evaluation split is found on first use."""
        val = self._val_split or self._find_eval_split()
        return {"fit": self.train_split, "validate": val, "test": self._test_split or val}

    def _find_eval_split(self) -> str:
        present = [s for s in EVAL_SPLIT_FALLBACKS if (self.root / s).is_dir()]
        if not present:
            return EVAL_SPLIT_FALLBACKS[0]  # _check_split then says what the root holds
        if present[0] != EVAL_SPLIT_FALLBACKS[0]:
            log.info("data: no val/ under %s; evaluating on %s/ (data.val_split=...)", self.root, present[0])
        self._val_split = present[0]
        return present[0]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def num_classes(self) -> int:
        if self._classes is None:
            self._classes = self._check_split(self.splits["test"])
        return len(self._classes)

    @property
    def bad_images(self) -> int:
        """How many images were skipped as undecodable so far (``data.on_bad_image=skip``)."""
        return len(self.bad_image_paths)

    @property
    def bad_image_paths(self) -> list[str]:
        return sorted({p for d in self._datasets.values() for p in d.bad_paths})

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
            hint = ""
            if split == self.splits["validate"] and self._val_split is None:
                hint = f" (none of {list(EVAL_SPLIT_FALLBACKS)} exists: name yours with data.val_split=NAME)"
            elif split == self.train_split:
                hint = " (name yours with data.train_split=NAME)"
            raise DataLayoutError(
                f"expected a split folder {str(folder)!r}; {str(self.root)!r} contains {present[:10]}{hint}"
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

    def preprocessing_record(self) -> dict[str, Any]:
        p = self.preprocessing
        return {**p.values(), "image_size": self.image_size, "origin": p.origin}

    def transform(self, train: bool):
        """The transform of the training split (``data.augment``) or of the evaluation splits."""
        if train:
            return train_transform(self.augment, self.image_size, self.preprocessing)
        return self.preprocessing.eval_transform(self.image_size)

    def setup(self, stage: str | None = None) -> None:
        for s in ("fit", "test") if stage is None else (stage,):
            split = self.splits.get(s, self.splits["test"])
            if split in self._datasets:
                continue
            dataset = CheckedImageFolder(
                str(self.root / split),
                transform=self.transform(train=s == "fit"),
                mode="L" if self.channels == 1 else "RGB",
                on_bad_image=self.on_bad_image,
            )
            counted = (self.content.get(split) or {}).get("images")
            if counted is not None and counted != len(dataset):
                raise DataLayoutError(
                    f"{self.root / split} holds {len(dataset)} images, but {counted} when this run's "
                    f"identity was taken (data.content): the folder changed during the run; run it again"
                )
            if s != "fit" and self.decoded_cache:
                dataset = self._decoded(split, dataset)
            self._datasets[split] = dataset
        if stage == "fit":
            self.setup("validate")

    def _decoded(self, split: str, dataset: CheckedImageFolder) -> CheckedImageFolder | DecodedSplit:
        """The evaluation split read from its decoded cache (built on first use), or ``dataset`` with
        a warning when the cache cannot be built (no ``cache_dir``, a full disk)."""
        from ..results.content import split_content

        if not self.cache_dir:
            log.warning("data.decoded_cache=true needs data.cache_dir; decoding %s each time", split)
            return dataset
        folder = self.root / split
        p = self.preprocessing
        cache = DecodedCache(
            self.cache_dir,
            folder,
            dataset.samples,
            self.content.get(split) or split_content(folder, self.cache_dir),
            self.transform(train=False),
            "L" if self.channels == 1 else "RGB",
            self.image_size,
            {"crop_pct": p.crop_pct, "crop_mode": p.crop_mode, "interpolation": p.interpolation},
        )
        try:
            decoded = cache.load(self.num_workers, self.on_bad_image)
        except OSError as e:
            log.warning("data.decoded_cache: %s; decoding %s each time", e, folder)
            return dataset
        for _, why in sorted(decoded.bad.items()):
            if self.on_bad_image == "fail":
                raise BadImageError(f"{why} (data.on_bad_image=skip leaves such files out)")
            log.warning("skipping %s (data.on_bad_image=skip)", why)
        log.info("data: %s read from its decoded cache %s", folder, cache.path)
        return decoded

    def _loader(self, dataset, train: bool):
        collate = whole_batch if isinstance(dataset, DecodedSplit) else collate_decoded
        return super()._loader(dataset, train, collate_fn=collate)

    def train_dataloader(self):
        return self._loader(self._datasets[self.splits["fit"]], train=True)

    def val_dataloader(self):
        return self._loader(self._datasets[self.splits["validate"]], train=False)

    def test_dataloader(self):
        return self._loader(self._datasets[self.splits["test"]], train=False)


def _given_preprocessing(preprocess: dict[str, Any] | None) -> Preprocessing:
    """The data module's preprocessing from resolved ``data.preprocess`` values (None: DeiT's)."""
    if preprocess is None:
        return resolve_preprocessing({"source": "deit"})
    preprocess = dict(preprocess)
    missing = [k for k in PREPROCESS_KEYS if preprocess.get(k) is None]
    if missing:
        raise ValueError(
            f"data.preprocess is not resolved ({missing} unset): run through run.py, or resolve it first "
            f"with tnt_lightning.tasks.inputs.resolve_inputs(cfg)"
        )
    origin = preprocess.pop("origin", None) or "the values given in data.preprocess"
    return dataclasses.replace(resolve_preprocessing({**preprocess, "source": "given"}), origin=origin)


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in entries)
