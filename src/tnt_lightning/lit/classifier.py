"""The LightningModule every task runs: top-1/top-5 evaluation and supervised training."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from .optim import OptimConfig, build_optimizer


class TopKCorrect(Metric):
    """How many images had their label among the ``k`` highest logits, and how many were seen.

    Counted in integers (summed over DDP processes), so an accuracy is exactly correct / total
    rather than a float32 mean.
    """

    full_state_update = False

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        top = logits.topk(self.k, dim=-1).indices
        self.correct += (top == target[:, None]).any(dim=-1).sum()
        self.total += target.numel()

    def compute(self) -> tuple[int, int]:
        return int(self.correct), int(self.total)


class ImageClassifier(L.LightningModule):
    """A classifier around ``model``; only parameters with ``requires_grad`` are trained.

    Accuracies are logged in percent as ``{val,test}/acc1`` and ``{val,test}/acc5``; the counts
    behind the last evaluation of each stage are in :attr:`counts` (:meth:`accuracy` reads them).
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
                f"{stage}_{name}": TopKCorrect(k)
                for stage in ("val", "test")
                for name, k in (("acc1", 1), ("acc5", top5))
            }
        )
        self.counts: dict[str, dict[str, int]] = {}
        # The training step of the last full validation (not the sanity check): a caller that needs
        # the trained model's validation accuracy runs one only if the fit did not end on one.
        self.validated_at_step: int | None = None

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
        counts = {}
        for name in ("acc1", "acc5"):
            metric = self.metrics[f"{stage}_{name}"]
            correct, total = metric.compute()
            counts[f"correct_{name[3:]}"], counts["images"] = correct, total
            self.log(f"{stage}/{name}", 100.0 * correct / max(total, 1), prog_bar=name == "acc1")
            metric.reset()
        self.counts[stage] = counts

    def accuracy(self, stage: str) -> dict[str, float | int]:
        """Top-1 and top-5 accuracy in percent of the last ``stage`` evaluation, computed from the
        integer counts (``acc1``, ``acc5``), with the counts (``correct_1``, ``correct_5``,
        ``images``).

        Args:
            stage: ``val`` or ``test``.

        Returns:
            The accuracies and counts.
        """
        c = self.counts[stage]
        total = max(c["images"], 1)
        return {"acc1": 100.0 * c["correct_1"] / total, "acc5": 100.0 * c["correct_5"] / total, **c}

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
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.trainer.global_step

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        steps = self.trainer.estimated_stepping_batches
        epochs = max(1, self.trainer.max_epochs or 1)
        optimizer, scheduler = build_optimizer(params, self.optim, max(1, steps // epochs), epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
