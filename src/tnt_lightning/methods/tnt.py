"""TNT, Training Noise Token pruning (Rao, Jiang, Moyer 2024): the method this project reproduces.

A Noise Allocator scores the patch tokens after each of the first blocks: alpha = softmax over
the patches of a linear head (``alpha_heads.{l}``, named as in the official code so its released
checkpoints load). In training, Gaussian noise of amplitude (1 - alpha_i) is added to each patch
token, so the heads learn which tokens the frozen backbone can least afford to perturb. At test
time the tokens with the lowest alpha are dropped (docs/methods/tnt.md):

* single-layer (after block l): keep the top ``int(n*K) + s`` by alpha, then random-partition
  similarity pruning removes ``s`` of them;
* multi-layer: similarity pruning of ``s`` tokens with random importance before block 0, then
  the top ``int(n*rate)`` by alpha after each location.

Official quirks reproduced by default, each with a switch: ``beta`` multiplies a *standard*
normal (the paper writes it as a variance: ``beta_is_variance``); the whole stream passes through
``alpha_norm`` (a LayerNorm frozen at identity affine by a ``requires_grad`` bug) before the
noise is added, in training only (``alpha_norm_train``); only heads 0..4 are trained.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import AttentionInfo, BackboneInfo, Location, ReductionError, Site, Tokens, gather_rows
from ..engine.registry import register_method
from .common.keep import keep_floor
from .common.learned import LearnedReducer, TrainingOutput, classification_loss
from .common.similarity import random_partition_merge, random_partition_prune, sequential_partition_prune

log = logging.getLogger(__name__)

ALLOCATORS = ("linear", "mlp")
SIMILARITY = ("random", "sequential", "merge", "none")
PERMUTATIONS = ("per_batch", "per_sample")


def make_alpha_head(dim: int, allocator: str) -> nn.Module:
    """Linear D->1 (the paper), or the DeiT-T "TNT+MLP" allocator: D->2D->1 (inferred:
    docs/methods/tnt.md#allocator)."""
    if allocator == "linear":
        head = nn.Linear(dim, 1)
    else:
        head = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, 1))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


@register_method(
    "tnt",
    kind="learned",
    operation="pruning",
    keep_rule="int(n*K) + s by alpha, then s by similarity (multi-layer: int(n*K))",
    paper="Rao, Jiang, Moyer, TNT, 2024",
    reference="official TNT code",
    order=9,
    colour="#17becf",
)
class TNT(LearnedReducer):
    conformance_exceptions = {
        "batch-independent": "multi-layer: the step before block 0 draws one row of random importance per "
        "image of the batch (torch.rand(B, n), as the official code), so an image's similarity pruning "
        "depends on its place in the batch; single-layer passes"
    }

    def __init__(
        self,
        info: BackboneInfo,
        schedule: str,
        blocks: Sequence[int],
        rates: Sequence[float],
        similarity_tokens: int = 25,
        pre_similarity_tokens: int = 40,
        noise_blocks: int = 5,
        beta: float = 0.02,
        beta_is_variance: bool = False,
        alpha_norm_train: bool = True,
        alpha_norm_trainable: bool = False,
        allocator: str = "linear",
        similarity: str = "random",
        permutation: str = "per_batch",
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)
        for key, value, allowed in (
            ("allocator", allocator, ALLOCATORS),
            ("similarity", similarity, SIMILARITY),
            ("permutation", permutation, PERMUTATIONS),
        ):
            if value not in allowed:
                raise ReductionError(f"method.{key}={value!r} is not one of {list(allowed)}")
        if len(blocks) != len(rates):
            raise ReductionError(
                f"method=tnt: {len(rates)} rates {list(rates)} for {len(blocks)} locations {list(blocks)}"
            )
        if not 0 < noise_blocks <= info.depth:
            raise ReductionError(f"method.noise_blocks={noise_blocks} must be in 1..{info.depth}")
        self.schedule = schedule
        self.rates = {int(b): float(r) for b, r in zip(blocks, rates, strict=True)}
        self.similarity_tokens = similarity_tokens
        self.pre_similarity_tokens = pre_similarity_tokens
        self.noise_blocks = noise_blocks
        self.beta = math.sqrt(beta) if beta_is_variance else beta
        self.beta_settings = {"beta": beta, "beta_is_variance": beta_is_variance}
        self.alpha_norm_train = alpha_norm_train
        self.allocator = allocator
        self.similarity = similarity
        self.per_sample = permutation == "per_sample"
        self.alpha_heads = nn.ModuleList(
            make_alpha_head(info.embed_dim, allocator) for _ in range(info.depth)
        )
        self.alpha_norm = nn.LayerNorm(info.embed_dim, eps=1e-6)
        self.alpha_norm.requires_grad_(alpha_norm_trainable)
        self.alpha_norm_trainable = alpha_norm_trainable
        self.last_alpha: list[Tensor] = []

    @classmethod
    def from_schedule(
        cls, schedule: str, blocks: list[int], rates: list[float], info: BackboneInfo, **options
    ):
        return cls(info, schedule, blocks, rates, **options)

    # -- where and what ------------------------------------------------------------------------

    def locations(self) -> list[Location]:
        if self.training:
            return [Location(Site.AFTER, b) for b in range(self.noise_blocks)]
        after = [Location(Site.AFTER, b) for b, r in sorted(self.rates.items()) if r < 1.0]
        return after if self.schedule == "single" else [Location(Site.PRE), *after]

    def bind(self, info: BackboneInfo) -> None:
        super().bind(info)
        if self.schedule == "single" and len(self.rates) != 1:
            raise ReductionError(f"method=tnt single-layer acts at one block, got {sorted(self.rates)}")
        untrained = [b for b in self.rates if b >= self.noise_blocks]
        if untrained:
            raise ReductionError(
                f"method=tnt prunes after block(s) {untrained}, but only the alpha heads of blocks "
                f"0..{self.noise_blocks - 1} are trained (noise is added after those blocks only, as in the "
                f"official code); choose locations below {self.noise_blocks} or raise method.noise_blocks"
            )
        n = info.num_patches
        if self.schedule == "single":
            ((block, rate),) = self.rates.items()
            k = keep_floor(n, rate)
            s = self._clamped_s(n, k, self.similarity_tokens, f"after block {block}")
            self.single_s = s if self.similarity != "none" else 0
            if k < 1:
                raise ReductionError(f"method=tnt keep_rate={rate} keeps no token of {n}; raise keep_rate")
            return
        s = self.pre_similarity_tokens
        if s > n // 2:
            raise ReductionError(f"method.pre_similarity_tokens={s} exceeds half of the {n} patches")
        n -= s
        for block, rate in sorted(self.rates.items()):
            if rate < 1.0:
                n = keep_floor(n, rate)
            if n < 1:
                raise ReductionError(f"method=tnt would keep no token after block {block}; raise the rates")

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each location in eval mode (bound): multi-layer drops
        ``pre_similarity_tokens`` before block 0; each block keeps ``int(n*K)``."""
        n, out = self.info.num_patches, {}
        for loc in self.locations():
            n = out[loc] = (
                n - self.pre_similarity_tokens
                if loc.site is Site.PRE
                else keep_floor(n, self.rates[loc.block])
            )
        return out

    @staticmethod
    def _clamped_s(n: int, k: int, s: int, where: str) -> int:
        """RPSP needs k + s <= n and s <= (k + s) // 2 (docs/methods/tnt.md#rpsp): clamp, with a warning."""
        s_eff = min(s, n - k)
        while s_eff > 0 and s_eff > (k + s_eff) // 2:
            s_eff -= 1
        if s_eff != s:
            log.warning(
                "tnt %s: similarity pruning of s=%d needs k + s <= n and s <= (k+s)//2 "
                "(n=%d, k=%d); using s=%d",
                where,
                s,
                n,
                k,
                s_eff,
            )
        return s_eff

    # -- forward -------------------------------------------------------------------------------

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        if self.training:
            return self.add_noise(loc.block, tokens)
        if loc.site is Site.PRE:
            return self.pre_block_similarity(tokens)
        return self.prune(loc.block, tokens)

    def alpha(self, block: int, patches: Tensor) -> Tensor:
        return self.alpha_heads[block](patches).squeeze(-1).softmax(dim=-1)

    def add_noise(self, block: int, tokens: Tokens) -> Tokens:
        """Training: x <- alpha_norm(x) + beta * (1 - alpha) * N(0, I) on the patch tokens."""
        p = tokens.num_prefix
        alpha = self.alpha(block, tokens.patches)
        if block == 0:
            self.last_alpha = []
        self.last_alpha.append(alpha.detach())
        noise = (1.0 - alpha).unsqueeze(-1) * torch.randn_like(tokens.patches)
        x = self.alpha_norm(tokens.x) if self.alpha_norm_train else tokens.x
        x = torch.cat([x[:, :p], x[:, p:] + self.beta * noise], dim=1)
        return tokens.with_x(x)

    def pre_block_similarity(self, tokens: Tokens) -> Tokens:
        """Multi-layer: RPSP of s tokens before block 0, with random importance (only the order)."""
        # As the official code: the importance comes from the CPU generator and is then moved to
        # the tokens' device; the partition is drawn on the tokens' device. On CPU both draws come,
        # in this order, from one generator; on CUDA the importance still reproduces the CPU run's.
        device = tokens.x.device
        importance = torch.rand(tokens.x.shape[0], tokens.n, generator=self.generator(torch.device("cpu")))
        importance = importance.to(device)
        s = self.pre_similarity_tokens
        idx = random_partition_prune(
            tokens.patches,
            importance,
            s,
            tokens.n - s,
            generator=self.generator(device),
            per_sample=self.per_sample,
        )
        return tokens.keep(idx)

    def prune(self, block: int, tokens: Tokens) -> Tokens:
        n = tokens.n
        k = keep_floor(n, self.rates[block])
        alpha = self.alpha(block, tokens.patches)
        if self.schedule == "multi" or self.single_s == 0:
            return tokens.keep(alpha.topk(k, dim=1, sorted=True).indices)
        s = self.single_s
        candidates = alpha.topk(k + s, dim=1, sorted=True).indices
        features, importance = gather_rows(tokens.patches, candidates), gather_rows(alpha, candidates)
        g = self.generator(tokens.x.device)
        if self.similarity == "random":
            survivors = random_partition_prune(
                features, importance, s, k, generator=g, per_sample=self.per_sample
            )
        elif self.similarity == "sequential":
            survivors = sequential_partition_prune(features, importance, s)[:, :k]
        else:  # the "token merge" ablation; sources trace the hosts only
            survivors, merged = random_partition_merge(
                features, features, importance, s, k, generator=g, per_sample=self.per_sample
            )
            kept = gather_rows(candidates, survivors)
            x = torch.cat([tokens.prefix, gather_rows(merged, survivors)], dim=1)
            return Tokens(x, tokens.num_prefix, source=tokens.keep(kept).source)
        return tokens.keep(gather_rows(candidates, survivors))

    # -- training ------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        heads = [
            (f"alpha_heads.{n}", p)
            for n, p in self.alpha_heads.named_parameters()
            if int(n.split(".")[0]) < self.noise_blocks
        ]
        norm = (
            [(f"alpha_norm.{n}", p) for n, p in self.alpha_norm.named_parameters()]
            if self.alpha_norm_trainable
            else []
        )
        return heads + norm

    def training_key(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "allocator": self.allocator,
            "noise_blocks": self.noise_blocks,
            **self.beta_settings,
            "alpha_norm_train": self.alpha_norm_train,
            "alpha_norm_trainable": self.alpha_norm_trainable,
        }

    def training_loss(
        self,
        model: nn.Module,
        x: Tensor,
        targets: Tensor,
        label_smoothing: float,
        teacher: nn.Module | None = None,
    ) -> TrainingOutput:
        """Cross-entropy on the CLS head only: the official loss ignores a distilled model's DIST head."""
        features = model.forward_features(x)
        if self.info.distilled:
            logits = model.head(model.head_drop(features[:, 0]))
        else:
            logits = model.forward_head(features)
        loss = classification_loss(logits, targets, label_smoothing)
        alpha = torch.stack([a.float() for a in self.last_alpha])  # [blocks, B, n]
        entropy = -(alpha * alpha.clamp_min(1e-12).log()).sum(-1).mean()
        stats = {
            "alpha_max": alpha.amax(-1).mean(),
            "alpha_entropy": entropy,
            "alpha_entropy_uniform": torch.tensor(math.log(alpha.shape[-1])),
        }
        return TrainingOutput(loss, logits.detach(), stats)

    def extra_repr(self) -> str:
        return f"{self.schedule}, rates={self.rates}, similarity={self.similarity}, beta={self.beta}"
