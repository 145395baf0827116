"""DynamicViT (Rao et al., NeurIPS 2021) and dTPS (Wei et al., CVPR 2023).

After each stage's block, a small predictor (``score_predictor.{j}``, named as in the official
code) scores the patch tokens from their own features and a masked mean of the others. Stage j
keeps ``int(n0 * rho_j)`` of the *initial* n0 patches (``rho_j = rho ** j`` for a scalar keep
rate), ranked by the predicted keep log-probability (docs/methods/dynamicvit.md).

Training never removes tokens: hard Gumbel-softmax decisions (straight-through) become an
attention mask in every later block (DynamicViT's masked softmax), and the loss is the official
one: cross-entropy + a keep-ratio term + KL to the frozen unpruned backbone's logits + a token
distillation term on the tokens kept to the end (MSE for DeiT; dTPS uses a channel KL).

dTPS additionally squeezes the tokens pruned at a stage into their most similar kept tokens
(section 8.2): masked in training, for real at inference.

``official_rounding=True`` runs the training step's masked softmax rounded where the official
code rounds (:func:`~tnt_lightning.engine.attention.official_rounding`), for float64 comparisons
with it; the default keeps the more accurate rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import AttentionInfo, BackboneInfo, Location, ReductionError, Site, Tokens, gather_rows
from ..engine.attention import official_rounding
from ..engine.registry import register_method
from .common.learned import LearnedReducer, TrainingOutput, classification_loss
from .common.squeeze import squeeze, squeeze_masked

TOKEN_LOSSES = ("mse", "kl")


class PredictorLG(nn.Module):
    """DynamicViT's local-global token scorer: log-probabilities of (keep, drop) per token."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2),
            nn.GELU(),
            nn.Linear(dim // 2, dim // 4),
            nn.GELU(),
            nn.Linear(dim // 4, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        global_x = (x[..., half:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat([x[..., :half], global_x.expand(-1, x.shape[1], -1)], dim=-1))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then give every submodule back its own mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


@register_method(
    "dynamicvit",
    kind="learned",
    operation="pruning",
    keep_rule="int(n0*rho^j) of the initial n0 at stage j",
    paper="Rao et al., DynamicViT, NeurIPS 2021",
    reference="official DynamicViT (raoyongming/DynamicViT)",
    order=4,
    colour="#9467bd",
)
class DynamicViT(LearnedReducer):
    squeeze_pruned = False
    # The paper-compat single-layer model: three stages where the schedule names one block.
    single_layer_compat = False

    def __init__(
        self,
        info: BackboneInfo,
        blocks: Sequence[int],
        keep_ratios: Sequence[float],
        ratio_weight: float = 2.0,
        distill_weight: float = 0.5,
        clf_weight: float = 1.0,
        token_loss: str = "mse",
        paper_flops_compat: bool = False,
        official_rounding: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        if len(blocks) != len(keep_ratios):
            raise ReductionError(
                f"method={self.name}: {len(keep_ratios)} keep ratios for {len(blocks)} stages"
            )
        for ratio in keep_ratios:
            if not 0.0 < ratio < 1.0:
                raise ReductionError(
                    f"method={self.name}: keep ratio rho={ratio} is outside (0, 1); DynamicViT must prune "
                    f"at every stage (e.g. keep_rate=0.7)"
                )
        if token_loss not in TOKEN_LOSSES:
            raise ReductionError(f"method.token_loss={token_loss!r} is not one of {list(TOKEN_LOSSES)}")
        self.blocks = [int(b) for b in blocks]
        self.keep_ratios = [float(r) for r in keep_ratios]
        self.ratio_weight, self.distill_weight, self.clf_weight = ratio_weight, distill_weight, clf_weight
        self.token_loss = token_loss
        self.paper_flops_compat = paper_flops_compat
        self.official_rounding = official_rounding
        self.cls_only_backbone = paper_flops_compat
        self.score_predictor = nn.ModuleList(PredictorLG(info.embed_dim) for _ in self.blocks)
        self.decisions: list[Tensor] = []

    @classmethod
    def from_schedule(
        cls,
        schedule: str,
        blocks: list[int],
        rates: list[float],
        info: BackboneInfo,
        paper_flops_compat: bool = False,
        **options,
    ):
        """Single-layer: one predictor keeping ``int(n0*K)``; with ``paper_flops_compat`` the official
        3-stage model with ratios [K, K, K] (its GFLOPs are the paper's). Multi-layer: per-location
        rates r_j give cumulative ratios r_1 * ... * r_j; a scalar keep rate rho gives rho ** j."""
        if schedule == "single":
            if paper_flops_compat:
                b = blocks[0]
                reducer = cls(info, [b, b + 3, b + 6], rates * 3, paper_flops_compat=True, **options)
                reducer.single_layer_compat = True
                return reducer
            return cls(info, blocks, rates, **options)
        if len(set(rates)) == 1:
            ratios = [rates[0] ** (j + 1) for j in range(len(rates))]
        else:
            ratios = [
                float(torch.tensor(rates[: j + 1], dtype=torch.float64).prod()) for j in range(len(rates))
            ]
        return cls(info, blocks, ratios, paper_flops_compat=paper_flops_compat, **options)

    def bind(self, info: BackboneInfo) -> None:
        super().bind(info)
        counts = [int(info.num_patches * r) for r in self.keep_ratios]
        if min(counts) < 1:
            raise ReductionError(
                f"method={self.name} keep ratios {self.keep_ratios} leave no token of "
                f"{info.num_patches}; raise keep_rate"
            )

    def resolved_schedule(self) -> dict[str, Any]:
        """What runs: the stages' blocks and keep ratios (of the initial patches), for the record.

        Paper-compat single-layer runs three stages, after blocks b, b+3, b+6, each keeping K.
        """
        record: dict[str, Any] = {"blocks": list(self.blocks), "keep_ratios": list(self.keep_ratios)}
        if self.single_layer_compat:
            record["rates"] = list(self.keep_ratios)
        return record

    def locations(self) -> list[Location]:
        stages = [Location(Site.AFTER, b) for b in self.blocks]
        return [Location(Site.PRE), *stages] if self.training else stages

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each stage in eval mode (bound): ``int(n0 * ratio)``, the kit's rule."""
        n0 = self.info.num_patches
        return {
            Location(Site.AFTER, b): int(n0 * r) for b, r in zip(self.blocks, self.keep_ratios, strict=True)
        }

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        if loc.site is Site.PRE:  # masked training: every block from here on uses the masked softmax
            self.decisions = []
            return Tokens(
                tokens.x,
                tokens.num_prefix,
                tokens.size,
                tokens.source,
                policy=tokens.x.new_ones(*tokens.x.shape[:2], 1),
            )
        stage = self.blocks.index(loc.block)
        if self.training:
            return self.mask(stage, tokens)
        return self.prune(stage, tokens)

    def mask(self, stage: int, tokens: Tokens) -> Tokens:
        p = tokens.num_prefix
        previous = tokens.policy[:, p:]
        logits = self.score_predictor[stage](tokens.patches, previous)
        keep = F.gumbel_softmax(logits, hard=True)[..., 0:1] * previous
        self.decisions.append(keep.flatten(1))
        x = tokens.x
        if self.squeeze_pruned:
            x = torch.cat([tokens.prefix, squeeze_masked(tokens.patches, keep, (1 - keep) * previous)], dim=1)
        policy = torch.cat([tokens.policy[:, :p], keep], dim=1)
        return Tokens(x, p, tokens.size, tokens.source, policy=policy)

    def prune(self, stage: int, tokens: Tokens) -> Tokens:
        score = self.score_predictor[stage](tokens.patches, tokens.x.new_ones(*tokens.patches.shape[:2], 1))[
            ..., 0
        ]
        order = score.argsort(dim=1, descending=True)
        k = int(self.info.num_patches * self.keep_ratios[stage])
        kept = tokens.keep(order[:, :k])
        if not self.squeeze_pruned or k >= tokens.n:
            return kept
        hosts, _ = squeeze(kept.patches, gather_rows(tokens.patches, order[:, k:]))
        return Tokens(torch.cat([kept.prefix, hosts], dim=1), tokens.num_prefix, source=kept.source)

    # -- training ------------------------------------------------------------------------------

    def training_key(self) -> dict[str, Any]:
        key = {
            "method": self.name,
            "blocks": self.blocks,
            "keep_ratios": self.keep_ratios,
            "paper_flops_compat": self.paper_flops_compat,
            "ratio_weight": self.ratio_weight,
            "distill_weight": self.distill_weight,
            "clf_weight": self.clf_weight,
            "token_loss": self.token_loss,
        }
        if self.official_rounding:  # only when set: the key of artefacts trained before it existed
            key["official_rounding"] = True
        return key

    def training_loss(
        self,
        model: nn.Module,
        x: Tensor,
        targets: Tensor,
        label_smoothing: float,
        teacher: nn.Module | None = None,
    ) -> TrainingOutput:
        """The official loss, against the frozen pretrained backbone run unpruned in eval mode as the
        teacher (``model`` itself unless its backbone is being fine-tuned). With
        ``official_rounding``, the student's masked softmax rounds as the official code's."""
        p = self.info.num_prefix
        with official_rounding() if self.official_rounding else contextlib.nullcontext():
            features = model.forward_features(x)
        logits = model.forward_head(features)
        kept = model.last_tokens.policy[:, p:, 0].detach() > 0.5
        teacher = model if teacher is None else teacher
        with torch.no_grad(), teacher.reduction_disabled(), eval_mode(teacher):
            teacher_features = teacher.forward_features(x)
            teacher_logits = teacher.forward_head(teacher_features)

        cls_loss = classification_loss(logits, targets, label_smoothing)
        ratio_loss = sum(
            ((d.mean(dim=1) - r) ** 2).mean() for d, r in zip(self.decisions, self.keep_ratios, strict=True)
        ) / len(self.blocks)
        logit_kl = F.kl_div(
            F.log_softmax(logits, dim=-1),
            F.log_softmax(teacher_logits, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        student, teacher = features[:, p:][kept], teacher_features[:, p:][kept]
        if student.numel() == 0:
            token_loss = features.new_zeros(())
        elif self.token_loss == "mse":
            token_loss = (student - teacher).pow(2).mean()
        else:
            token_loss = F.kl_div(
                F.log_softmax(student, dim=-1),
                F.log_softmax(teacher, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
        loss = (
            self.clf_weight * cls_loss
            + self.ratio_weight * ratio_loss
            + self.distill_weight * logit_kl
            + self.distill_weight * token_loss
        )
        stats = {
            "cls_loss": cls_loss.detach(),
            "ratio_loss": ratio_loss.detach(),
            "logit_kl": logit_kl.detach(),
            "token_loss": token_loss.detach(),
            "kept_fraction": self.decisions[-1].mean().detach(),
        }
        return TrainingOutput(loss, logits.detach(), stats)


@register_method(
    "dtps",
    kind="learned",
    operation="pruning+merging",
    keep_rule="int(n0*rho^j) of the initial n0 at stage j",
    paper="Wei et al., TPS, CVPR 2023",
    reference="official TPS code (dTPS)",
    order=5,
    colour="#8c564b",
)
class DTPS(DynamicViT):
    """dTPS: DynamicViT's decisions, with every stage's pruned tokens squeezed into their hosts."""

    squeeze_pruned = True
