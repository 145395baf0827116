"""Mixup/CutMix in a learned method's training: on for every step, or refused before the first one.

timm's ``Mixup`` needs an even batch; an odd one used to switch it off silently, for the whole
training when the configured batch size was odd."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import run_py, tiny_vit
from tnt_lightning.engine import apply_reducer, backbone_info
from tnt_lightning.errors import ConfigError
from tnt_lightning.lit import OptimConfig, TokenReductionModule
from tnt_lightning.methods import TNT
from tnt_lightning.results import read_records

IMAGES = TensorDataset(torch.randn(7, 3, 32, 32), torch.arange(7) % 10)


class Images(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(IMAGES, batch_size=self.batch_size, drop_last=True)


def _module(mixup: float = 0.8, cutmix: float = 1.0) -> tuple[TokenReductionModule, list[torch.Tensor]]:
    """A TNT module whose training losses record the targets they were given."""
    model = tiny_vit(prefix=1, depth=4)
    tnt = TNT(backbone_info(model), "single", [1], [0.5], noise_blocks=2)
    apply_reducer(model, tnt)
    targets: list[torch.Tensor] = []
    loss = tnt.training_loss
    tnt.training_loss = lambda model, x, y, *rest: targets.append(y) or loss(model, x, y, *rest)
    return TokenReductionModule(model, 10, OptimConfig(lr=1e-3), mixup=mixup, cutmix=cutmix), targets


def _fit(module: TokenReductionModule, **data) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, **data)


def test_an_odd_batch_size_with_mixup_is_refused_before_the_first_step():
    module, targets = _module()
    with pytest.raises(ConfigError, match=r"method.train.batch_size=3 is odd.*batch_size=4"):
        _fit(module, datamodule=Images(batch_size=3))
    assert targets == []


def test_an_even_batch_size_mixes_every_batch_and_no_mixup_takes_any():
    module, targets = _module()
    _fit(module, datamodule=Images(batch_size=2))
    assert len(targets) == 3 and all(t.shape == (2, 10) for t in targets)  # soft targets
    module, targets = _module(mixup=0.0, cutmix=0.0)
    _fit(module, datamodule=Images(batch_size=3))
    assert len(targets) == 2 and all(t.shape == (3,) for t in targets)


def test_a_loaders_short_odd_last_batch_is_refused_not_left_unmixed():
    module, targets = _module()
    with pytest.raises(ConfigError, match="a training batch of 3 images is odd.*drop_last"):
        _fit(module, train_dataloaders=DataLoader(IMAGES, batch_size=4))
    assert [t.shape for t in targets] == [(4, 10)]


def test_an_odd_recipe_batch_with_mixup_is_refused_before_the_run_starts(tmp_path):
    """Through run.py: refused by the preflight, naming the size and the fix; no record, no cache."""
    proc = run_py(
        ["task=train", "method=tnt", "data.train_overrides.batch_size=33", "data.train_overrides.mixup=0.8"],
        tmp_path,
        env={"HYDRA_FULL_ERROR": "0"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "batch size 33" in proc.stderr and "method.train.batch_size=34" in proc.stderr
    assert not (tmp_path / "results").exists() or not read_records(tmp_path / "results")
    assert not (tmp_path / "cache").exists()
