"""Learned soft merging to a fixed number of tokens: PatchMerger, Sinkhorn merging, SiT's slimming.

Haurum et al.'s three learned merging methods share one shape: before block l+1 (after block l) a
small trained module maps the n patch tokens to ``M = int(n0 * rho_j)`` output tokens through an
assignment matrix ``W`` [B, M, n] (a softmax over the input tokens, or a transport plan), and the
output tokens are ``W @ values`` [B, M, D]. What differs is how ``W`` and the values are made
(``MergeStage.forward``). The prefix tokens pass unchanged. Stage j keeps ``int(n0 * rho_j)`` of the
*initial* patches (Haurum's rule, docs/methods/conventions.md#haurum-rules), whatever n it receives.

Token maps: every input patch belongs to the output token it gives the most weight, the argmax of
``W`` over the outputs (Haurum's ``viz_mode`` hard assignment); an output no patch prefers has an
empty source. Sizes are not tracked: the reference uses no proportional attention.

Training (``lit/reduction.py``): the method's stages on the frozen backbone, cross-entropy on the
pruned model's logits (soft targets under mixup). Haurum fine-tunes the whole DeiT together with
the new modules (docs/methods/patchmerger.md#learned-merging-family); the framework trains the modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from ...engine import AttentionInfo, BackboneInfo, Location, ReductionError, Site, Tokens
from .absolute import AbsoluteStages, cumulative_ratios, merge_clusters
from .keep import keep_cumulative
from .learned import LearnedReducer, TrainingOutput, classification_loss


class MergeStage(nn.Module):
    """One stage: ``forward(patches [B, n, D]) -> (merged [B, M, D], assignment W [B, M, n])``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def init_like_timm_vit(module: nn.Module) -> None:
    """The initialisation Haurum's ``self.apply(self._init_weights)`` gives new layers (timm 0.4.12):
    Linear weights truncated-normal with std 0.02 and zero biases; LayerNorm ones and zeros."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SoftMergeReducer(AbsoluteStages, LearnedReducer):
    """After each of ``blocks``, the trained stage ``cluster_layers.{j}`` merges the patches into
    ``int(n0 * ratios[j])`` tokens (parameter names as Haurum's ``cluster_layers``)."""

    site: ClassVar[Site] = Site.AFTER

    def __init__(self, info: BackboneInfo, blocks: Sequence[int], ratios: Sequence[float], seed: int = 0):
        super().__init__(blocks, ratios, seed=seed)
        self.num_patches = info.num_patches
        self.counts = [keep_cumulative(info.num_patches, r, 1) for r in self.ratios]
        if min(self.counts) < 1:
            raise ReductionError(
                f"method={self.name}: keep ratios {self.ratios} leave no token of {info.num_patches}; "
                f"raise keep_rate"
            )
        self.cluster_layers = nn.ModuleList(self.make_stage(info.embed_dim, m) for m in self.counts)

    def make_stage(self, dim: int, outputs: int) -> MergeStage:
        raise NotImplementedError

    @classmethod
    def from_schedule(
        cls, schedule: str, blocks: list[int], rates: list[float], info: BackboneInfo, **options
    ):
        ratios = rates if schedule == "single" else cumulative_ratios(rates)
        return cls(info, blocks, ratios, **options)

    def bind(self, info: BackboneInfo) -> None:
        if info.num_patches != self.num_patches:
            raise ReductionError(
                f"method={self.name} was built for {self.num_patches} patches (its stages output "
                f"{self.counts} tokens), but this backbone has {info.num_patches}"
            )
        super().bind(info)

    def options(self) -> dict[str, Any]:
        """The method's own options that change its trained parameters (for ``training_key``)."""
        return {}

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        merged, assignment = self.cluster_layers[self.stage(loc)](tokens.patches)
        return merge_clusters(tokens, assignment.argmax(dim=1), merged.shape[1], merged)

    def training_key(self) -> dict[str, Any]:
        return {"method": self.name, "blocks": self.blocks, "keep_ratios": self.ratios, **self.options()}

    def training_loss(
        self,
        model: nn.Module,
        x: Tensor,
        targets: Tensor,
        label_smoothing: float,
        teacher: nn.Module | None = None,
    ) -> TrainingOutput:
        """Haurum's loss for these methods: cross-entropy of the reduced model (no distillation)."""
        logits = model(x)
        loss = classification_loss(logits, targets, label_smoothing)
        return TrainingOutput(loss, logits.detach(), {"cls_loss": loss.detach()})
