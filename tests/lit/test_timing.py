"""An evaluation's wall time splits into data, model and overhead, and says which bound it."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tnt_lightning.lit.timing import WallTimeSplit

PAUSE_S = 0.05
BATCHES = 4


class SlowImages(Dataset):
    """Four one-image batches; each image takes ``pause`` seconds to load."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    def __len__(self) -> int:
        return BATCHES

    def __getitem__(self, index: int):
        time.sleep(self.pause)
        return torch.zeros(3), 0


class SlowModel(L.LightningModule):
    """A test step that takes ``pause`` seconds."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause
        self.layer = torch.nn.Linear(3, 2)

    def test_step(self, batch, batch_idx):
        time.sleep(self.pause)
        return self.layer(batch[0]).sum()


@pytest.mark.parametrize("slow", ["data", "model"])
def test_the_slow_side_is_the_bound_and_the_parts_add_up(slow):
    split = WallTimeSplit()
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=[split],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(SlowImages(PAUSE_S if slow == "data" else 0.0), batch_size=1)
    trainer.test(SlowModel(PAUSE_S if slow == "model" else 0.0), dataloaders=data, verbose=False)
    s = split.split
    assert s["bound"] == slow and s["batches"] == BATCHES
    assert s[f"{slow}_s"] >= BATCHES * PAUSE_S
    assert s["data_s"] + s["model_s"] + s["overhead_s"] == pytest.approx(s["wall_s"], abs=1e-3)


@pytest.mark.gpu
def test_on_a_gpu_the_model_time_is_the_devices_and_the_parts_add_up():
    split = WallTimeSplit()
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = L.Trainer(accelerator="gpu", devices=1, callbacks=[split], **quiet)
    trainer.test(SlowModel(PAUSE_S), dataloaders=DataLoader(SlowImages(0.0), batch_size=1), verbose=False)
    s = split.split
    assert s["batches"] == BATCHES and s["model_s"] > 0
    assert s["data_s"] + s["model_s"] + s["overhead_s"] >= s["wall_s"] - 1e-3
