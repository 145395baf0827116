"""The LightningModule every task runs: top-1/top-5 evaluation and supervised training."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from .optim import OptimConfig, build_optimizer


class ImageClassifier(L.LightningModule):
    """A classifier around ``model``; only parameters with ``requires_grad`` are trained.

    Accuracies are logged in percent as ``{val,test}/acc1`` and ``{val,test}/acc5``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim or OptimConfig()
        self.label_smoothing = label_smoothing
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for stage in ("val", "test")
                for name, k in (("acc1", 1), ("acc5", top5))
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        for name in ("acc1", "acc5"):
            self.metrics[f"{stage}_{name}"].update(logits, y)

    def _eval_epoch_end(self, stage: str) -> None:
        for name in ("acc1", "acc5"):
            metric = self.metrics[f"{stage}_{name}"]
            self.log(f"{stage}/{name}", 100.0 * metric.compute(), prog_bar=name == "acc1")
            metric.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _restart_random_draws(self) -> None:
        """Each evaluation of a stochastic method (Random drop, TNT's partition) repeats exactly."""
        reducer = getattr(self.model, "reducer", None)
        if reducer is not None:
            reducer.reset_generators()

    def on_validation_start(self) -> None:
        self._restart_random_draws()

    def on_test_start(self) -> None:
        self._restart_random_draws()

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        steps = self.trainer.estimated_stepping_batches
        epochs = max(1, self.trainer.max_epochs or 1)
        optimizer, scheduler = build_optimizer(params, self.optim, max(1, steps // epochs), epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
