"""What learned methods add to a reducer: trainable parameters, a training loss, a training key.

The LightningModule (``lit/reduction.py``) is the same for all of them: it freezes the backbone,
trains the parameters :meth:`LearnedReducer.trainable_parameters` returns, and asks the method
for its loss. :meth:`LearnedReducer.training_key` names everything that determines the trained
parameters, so one training serves every evaluation that only changes the rest (a TNT allocator
serves a whole keep-rate sweep; DynamicViT is trained per keep ratio).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...engine import TokenReducer


@dataclass
class TrainingOutput:
    loss: Tensor
    logits: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


def classification_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy on hard labels ([B]) or on soft targets ([B, C], from mixup/cutmix)."""
    if targets.dim() == 2:
        return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


class LearnedReducer(TokenReducer):
    """Base class of methods that must be trained (on a frozen backbone) before they can prune."""

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters that train; everything else (backbone included) stays frozen."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def training_key(self) -> dict[str, Any]:
        """Everything about this method that determines its trained parameters."""
        raise NotImplementedError

    def training_loss(
        self,
        model: nn.Module,
        x: Tensor,
        targets: Tensor,
        label_smoothing: float,
        teacher: nn.Module | None = None,
    ) -> TrainingOutput:
        """The method's loss on a batch. ``teacher``: the frozen pretrained backbone (with this
        reducer applied) for methods that distil from it, given when ``model``'s backbone is itself
        being fine-tuned; None: ``model`` run unpruned is the teacher (its backbone is frozen)."""
        raise NotImplementedError

    def needs_training(self) -> bool:
        """Whether this configuration has parameters to train (DiffRate: only its search; a released
        schedule runs as it is)."""
        return True

    def check_trainable(self) -> None:
        """Raise if the trained parameters cannot serve the configured evaluation."""

    def backbone_in_train_mode(self) -> bool:
        """Whether the frozen backbone runs in train mode (drop path active) while this method trains."""
        return True
