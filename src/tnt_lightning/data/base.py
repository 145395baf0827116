"""What every DataModule of the framework shares: batch sizes, workers, pinned memory."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

# data.num_workers=auto: one loader worker per CPU this process may use, at most this many.
AUTO_WORKERS_MAX = 8


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a SLURM allocation or taskset counts)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(num_workers: int | str) -> int:
    """``data.num_workers`` as a count: ``auto`` is one per usable CPU (at most
    :data:`AUTO_WORKERS_MAX`), said in the log when that is fewer; an integer is used as given.

    Raises:
        ValueError: neither ``auto`` nor an integer >= 0.
    """
    if num_workers == "auto":
        cpus = usable_cpus()
        if cpus < AUTO_WORKERS_MAX:
            log.info(
                "data.num_workers=auto: %d loader workers, one per CPU this process may use "
                "(data.num_workers=N sets another count)",
                cpus,
            )
        return min(cpus, AUTO_WORKERS_MAX)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"data.num_workers={num_workers!r} must be 'auto' or an integer >= 0")
    return num_workers


class ClassificationDataModule(L.LightningDataModule):
    """Base DataModule. ``has_labels`` is False for cost-only data (no accuracy is measured).

    ``train_overrides``: changes to a learned method's training recipe for this dataset's scale
    (the recipes in ``conf/method`` are the official ImageNet ones).
    """

    has_labels: bool = True

    def __init__(
        self,
        name: str,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        pin_memory: bool | None = None,
        train_overrides: dict | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{key}={value!r} must be a positive integer")
        self.name = name
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = loader_workers(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # Learned methods' recipes (conf/method/*.yaml) are ImageNet's; a small dataset shortens them.
        self.train_overrides = dict(train_overrides or {})

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def preprocessing_record(self) -> dict[str, Any]:
        """What was done to the images before the model saw them, for the run's record."""
        raise NotImplementedError

    def check(self, stages: tuple[str, ...]) -> None:
        """Fail early, before any model is built, if the data for ``stages`` is not usable."""

    def _loader(self, dataset: Dataset, train: bool, collate_fn: Callable | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
        )
