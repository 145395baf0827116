"""An estimate of a training's whole duration, logged once its first steps are timed.

A run that trains implicitly (a backbone pretrained, or a learned method trained, before an
evaluation) announces its epochs before it starts; this callback adds how long that will take,
measured on this machine: the mean time of the steps after the first one (which pays for start-up)
times the steps left, plus the validation passes.
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12 min"`` or ``"2.3 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class TrainingTimeEstimate(Callback):
    """Logs "about N min for the whole training" after ``timed_steps`` steps of the first epoch run."""

    def __init__(self, timed_steps: int = 5) -> None:
        self.timed_steps = timed_steps
        self._start: float | None = None
        self._seen = 0
        self.estimate_s: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._seen = None, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.estimate_s is not None or trainer.sanity_checking:
            return
        self._seen += 1
        if self._seen == 1:  # the first step pays for start-up: time from its end
            self._start = time.perf_counter()
            return
        steps_per_epoch = trainer.num_training_batches
        if self._seen - 1 < min(self.timed_steps, steps_per_epoch - 1):
            return
        per_step = (time.perf_counter() - self._start) / (self._seen - 1)
        epochs_left = trainer.max_epochs - trainer.current_epoch
        steps_left = epochs_left * steps_per_epoch - self._seen
        # validation batches cost about a third of a training step each (forward only)
        val_batches = sum(trainer.num_val_batches) if isinstance(trainer.num_val_batches, list) else 0
        val_every = trainer.check_val_every_n_epoch or 1
        val_steps = val_batches * math.ceil(epochs_left / val_every) / 3
        self.estimate_s = per_step * (steps_left + val_steps)
        log.warning(
            "training time estimate: about %s more for %d epoch(s) of %d steps (%.2f s per step, timed "
            "over %d steps on this machine)",
            format_duration(self.estimate_s),
            epochs_left,
            steps_per_epoch,
            per_step,
            self._seen - 1,
        )
