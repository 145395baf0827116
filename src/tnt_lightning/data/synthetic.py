"""Random tensors of the model's input shape, for cost-only runs (GFLOPs, throughput, params)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from .base import ClassificationDataModule


class SyntheticDataModule(ClassificationDataModule):
    """No labels worth measuring: a run on it records cost only, and needs no weights."""

    has_labels = False

    def __init__(
        self,
        input_size: tuple[int, int, int] = (3, 224, 224),
        num_samples: int = 64,
        num_classes: int = 1000,
        name: str = "synthetic",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        train_overrides: dict | None = None,
    ) -> None:
        super().__init__(name, batch_size, eval_batch_size, num_workers, pin_memory, train_overrides)
        self.input_size = tuple(int(s) for s in input_size)
        self.num_samples = num_samples
        self._num_classes = num_classes

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def preprocessing_record(self) -> dict[str, Any]:
        return {"origin": "data=synthetic: random tensors of the model's input shape, no preprocessing"}

    def _dataset(self) -> TensorDataset:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.num_samples, *self.input_size, generator=g)
        y = torch.randint(0, self._num_classes, (self.num_samples,), generator=g)
        return TensorDataset(x, y)

    def train_dataloader(self):
        return self._loader(self._dataset(), train=True)

    def test_dataloader(self):
        return self._loader(self._dataset(), train=False)

    val_dataloader = test_dataloader
