"""Resumable training: ``last.ckpt`` written at the end of every epoch, atomically, with the RNG states.

Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` (2.6) writes ``last.ckpt`` only when
``fit`` ends, and its own "atomic" save goes through a temporary file in the system temp folder,
which is a plain copy into the target when that folder is on another filesystem. So this callback
writes ``.last.ckpt.partial`` beside ``last.ckpt``, syncs it and renames it: a run killed at any
moment leaves either the previous complete ``last.ckpt`` or the new one. It also stores the global
RNG states (torch, CUDA, NumPy, Python) of a one-process run, so that a resumed run draws the same
shuffles, noise and mixups as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def rng_states() -> dict[str, Any]:
    """The global RNG states, as tensors and ints only (so that ``weights_only`` loading reads them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(state), gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))


class LastCheckpoint(Checkpoint):
    """Keeps ``dirpath/last.ckpt`` up to date after every training epoch; :meth:`resume_point` says
    where a rerun starts.

    Epochs only: Lightning cannot resume a plain (not stateful) DataLoader mid-epoch exactly, so a
    step-wise checkpoint would not give the uninterrupted run's parameters.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self._saved_step = -1

    @property
    def path(self) -> Path:
        return self.dirpath / LAST

    def resume_point(self) -> dict[str, Any] | None:
        """What ``last.ckpt`` resumes (``epochs_done``, ``global_step``), or None if training starts afresh.

        A ``last.ckpt`` that cannot be read, or that this callback did not write, is reported with its
        path and removed: training restarts from epoch 0 instead of failing on every rerun.
        """
        self.dirpath.joinpath(f".{LAST}.partial").unlink(missing_ok=True)  # a write that was killed
        if not self.path.exists():
            return None
        try:
            checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
            point = checkpoint["resume"]
            return {"epochs_done": int(point["epochs_done"]), "global_step": int(point["global_step"])}
        except Exception as error:  # noqa: BLE001 - any unreadable file means the same: start again
            log.warning(
                "%s is damaged or was not written by this version (%s: %s): removing it, training "
                "restarts from epoch 0",
                self.path,
                type(error).__name__,
                error,
            )
            self.path.unlink(missing_ok=True)
            return None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` under a temporary name, then rename it (every rank takes part)."""
        if trainer.sanity_checking or trainer.global_step == self._saved_step:
            return
        partial = self.dirpath / f".{LAST}.partial"
        trainer.save_checkpoint(partial, weights_only=False)  # the whole training state
        if trainer.is_global_zero:
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            os.replace(partial, self.path)
        trainer.strategy.barrier()
        self._saved_step = trainer.global_step

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # With several processes, each has its own RNG streams: only a one-process run replays exactly.
        checkpoint["resume"] = {
            "epochs_done": trainer.current_epoch + 1,  # written when an epoch ends
            "global_step": trainer.global_step,
            "max_epochs": trainer.max_epochs,
            "rng": rng_states() if trainer.world_size == 1 else None,
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("resume", {}).get("rng")
        if states is not None and trainer.world_size == 1:
            set_rng_states(states)
