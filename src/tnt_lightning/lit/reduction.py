"""One LightningModule for every learned method: the method's parameters train, the backbone is
frozen or fine-tuned at a fraction of their lr (``backbone_lr_scale``, DynamicViT's 0.01x).

The method supplies its loss (:meth:`LearnedReducer.training_loss`); this module supplies the
rest of the recipe: the backbone kept in the mode the recipe says after every ``fit`` step,
mixup/cutmix with soft targets (an odd batch size is refused before the first step: timm's
``Mixup`` pairs each image with its mirror in the batch), AdamW with the recipe's schedule,
validation of the pruned model *and* of the full-token model, a frozen copy of the pretrained
backbone as the distillation teacher when the backbone trains, and checkpoints that hold only
the trained parameters.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.data import Mixup
from torch import nn

from ..errors import ConfigError
from ..methods.common.learned import LearnedReducer
from .classifier import ImageClassifier, TopKCorrect
from .optim import OptimConfig, build_optimizer


class TokenReductionModule(ImageClassifier):
    """Trains ``model.reducer``'s parameters on ``model`` (a timm ViT with a reducer applied), whose
    backbone is frozen (``backbone_lr_scale=0``) or trains at ``backbone_lr_scale`` x their lr."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optim: OptimConfig,
        label_smoothing: float = 0.1,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        backbone_lr_scale: float = 0.0,
    ) -> None:
        super().__init__(model, num_classes, optim, label_smoothing)
        reducer: LearnedReducer = model.reducer
        self.reducer = reducer
        self.backbone_lr_scale = backbone_lr_scale
        trainable = reducer.trainable_parameters()  # asked before freezing: it may read requires_grad
        # The teacher is the pretrained backbone as it was before any step (the official recipe's
        # separate teacher model); frozen, not saved.
        self.teacher = copy.deepcopy(model).requires_grad_(False).eval() if backbone_lr_scale > 0 else None
        for name, p in model.named_parameters():
            p.requires_grad_(backbone_lr_scale > 0 and not name.startswith("reducer."))
        for _, p in trainable:
            p.requires_grad_(True)
        self.mixup = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.strict_loading = False  # checkpoints hold only the trained parameters
        for stage in ("val", "test"):
            self.metrics[f"{stage}_acc1_full"] = TopKCorrect(1)
        self.acc1_full: dict[str, float] = {}

    # -- modes ---------------------------------------------------------------------------------

    def _set_modes(self) -> None:
        """Backbone in the recipe's mode (TNT: train mode, drop path active); the method trains.

        Batch-norm statistics (a conv stem's) are part of the pretrained backbone and stay as they
        are, in any mode: a method's training must not change what the unpruned backbone computes."""
        self.model.train(self.reducer.backbone_in_train_mode())
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        self.reducer.train()

    def on_train_epoch_start(self) -> None:
        self._set_modes()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._set_modes()

    def on_fit_end(self) -> None:
        self.model.eval()

    def setup(self, stage: str) -> None:
        """Refuse an odd training batch size before any step, if mixup/cutmix is on: every batch
        of it would be odd (the training loader drops only its last, short batch)."""
        size = getattr(self.trainer.datamodule, "batch_size", None)
        if stage == "fit" and size is not None:
            self._refuse_odd_batch(
                f"method.train.batch_size={size}",
                size,
                f"set method.train.batch_size={size + 1} (or any even size), or "
                "method.train.mixup=0 method.train.cutmix=0 to train without them",
            )

    def _refuse_odd_batch(self, what: str, size: int, fix: str) -> None:
        if self.mixup is not None and size % 2:
            raise ConfigError(
                f"{what} is odd, and mixup={self.mixup.mixup_alpha} / cutmix="
                f"{self.mixup.cutmix_alpha} need an even batch (timm's Mixup mixes each image with "
                f"its mirror in the batch): {fix}"
            )

    # -- steps ---------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        targets = y
        if self.mixup is not None:
            fix = "the training loader must drop its short last batch (drop_last=True)"
            self._refuse_odd_batch(f"a training batch of {x.shape[0]} images", x.shape[0], fix)
            x, targets = self.mixup(x, y)
        out = self.reducer.training_loss(self.model, x, targets, self.label_smoothing, self.teacher)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        for name, value in out.stats.items():
            self.log(f"train/{name}", value)
        return out.loss

    def _eval_step(self, batch, stage: str) -> None:
        super()._eval_step(batch, stage)
        if stage in self.acc1_full:  # a frozen backbone's accuracy cannot change: measured once
            return
        x, y = batch
        with self.model.reduction_disabled():
            self.metrics[f"{stage}_acc1_full"].update(self.model(x), y)

    def _eval_epoch_end(self, stage: str) -> None:
        super()._eval_epoch_end(stage)
        value = self.acc1_full.get(stage)
        if value is None:
            metric = self.metrics[f"{stage}_acc1_full"]
            correct, total = metric.compute()
            value = 100.0 * correct / max(total, 1)
            metric.reset()
            if not self.trainer.sanity_checking and self.teacher is None:  # sanity: a few batches only
                self.acc1_full[stage] = value
        self.counts[stage]["acc1_full"] = value
        self.log(f"{stage}/acc1_full", value)

    def configure_optimizers(self):
        steps = self.trainer.estimated_stepping_batches
        epochs = max(1, self.trainer.max_epochs or 1)
        optimizer, scheduler = build_optimizer(
            self.reducer.trainable_parameters(),
            self.optim,
            max(1, steps // epochs),
            epochs,
            scaled=(self.backbone_parameters(), self.backbone_lr_scale),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def backbone_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The backbone's parameters that train (none when it is frozen)."""
        named = self.model.named_parameters()
        return [(n, p) for n, p in named if p.requires_grad and not n.startswith("reducer.")]

    # -- checkpoints: only what trains -----------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trained = {f"model.reducer.{n}" for n, _ in self.reducer.trainable_parameters()}
        trained |= {f"model.{n}" for n, _ in self.backbone_parameters()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
