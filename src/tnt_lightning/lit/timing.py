"""Where an evaluation's wall time goes: waiting for data, running the model, or neither.

An ImageNet evaluation is often data-bound (JPEG decoding), and then a method's speedup does not
show in the job's time. :class:`WallTimeSplit` times the test loop from Lightning's hooks: *data*
is the time the loop waited from one batch's end to the next batch's start (the loader's read,
decode and transform, and the copy to the device), *model* the time from a batch's start to its
end (the forward pass and the metric update), *overhead* the rest of the loop. On a GPU the model
time is read from CUDA events, so that timing never synchronises the device between batches (the
next batch's loading still overlaps this batch's kernels); the events are read once, at the end.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class WallTimeSplit(L.Callback):
    """Splits the test loop's wall time into data, model and overhead (:attr:`split`)."""

    def __init__(self) -> None:
        self._start = self._last_end = self._batch_start = 0.0
        self._data = self._model = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._batches = 0
        self.split: dict[str, Any] | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last_end = time.perf_counter()
        self._data = self._model = 0.0
        self._events = []
        self._batches = 0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start = time.perf_counter()
        self._data += self._batch_start - self._last_end
        if pl_module.device.type == "cuda":
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._events:
            self._events[-1][1].record()
        self._last_end = time.perf_counter()
        self._model += self._last_end - self._batch_start
        self._batches += 1

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._events:  # the device's own time for the batches, read once
            torch.cuda.synchronize(pl_module.device)
            self._model = sum(start.elapsed_time(end) for start, end in self._events) / 1e3
        wall = time.perf_counter() - self._start
        self.split = {
            "wall_s": round(wall, 4),
            "data_s": round(self._data, 4),
            "model_s": round(self._model, 4),
            "overhead_s": round(max(wall - self._data - self._model, 0.0), 4),
            "batches": self._batches,
            "bound": "data" if self._data > self._model else "model",
        }
