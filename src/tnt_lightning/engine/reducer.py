"""What a token-reduction method is to the engine: a module that acts at declared locations.

A method declares where it acts (:class:`Location`: before block 0, inside block l between the
attention residual and the MLP, or after block l), what it needs from a block's attention
(probabilities, keys), and how it reduces :class:`~.tokens.Tokens` there. The engine
(:mod:`.patch`) calls it; the backbone stays timm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import UserError
from .tokens import Tokens


class Site(str, Enum):
    PRE = "pre"  # after patch and position embedding, before block 0
    # inside block l, before its attention: the method reduces with block l's attention
    # probabilities on the tokens before the step (one-step-ahead attention: MCTF), see
    # TokenReductionMixin._reduce_ahead
    AHEAD = "ahead"
    INSIDE = "inside"  # inside block l: after x + attn(norm1(x)), before the MLP
    AFTER = "after"  # after block l


@dataclass(frozen=True)
class Location:
    site: Site
    block: int = -1

    def __str__(self) -> str:
        if self.site is Site.AHEAD:
            return f"inside block {self.block}, before its attention"
        return "before block 0" if self.site is Site.PRE else f"{self.site.value} block {self.block}"


@dataclass(frozen=True)
class AttentionNeeds:
    probs: bool = False  # post-softmax attention probabilities [B, H, N, N]
    keys: bool = False  # keys [B, H, N, D/H]
    values: bool = False  # values [B, H, N, D/H] (ATS weighs attention by their norms)
    cls_probs: bool = False  # the CLS query's row of the probabilities only [B, H, 1, N]

    def __bool__(self) -> bool:
        return self.probs or self.keys or self.values or self.cls_probs


@dataclass
class AttentionInfo:
    """What a block's attention produced, for the methods that asked for it."""

    probs: Tensor | None = None
    keys: Tensor | None = None
    values: Tensor | None = None
    cls_probs: Tensor | None = None


@dataclass(frozen=True)
class BackboneInfo:
    """The facts about a timm ViT that schedules and checks depend on."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_hidden: int
    num_prefix: int
    num_patches: int
    has_class_token: bool
    distilled: bool
    global_pool: str


class ReductionError(UserError, ValueError):
    """A method cannot run as configured on this backbone (raised before the model runs)."""


class TokenReducer(nn.Module):
    """Base class of every method.

    Subclasses register with :func:`~.registry.register_method` (which sets ``name`` and
    ``requires_class_token``), implement :meth:`locations` and :meth:`reduce`, and override
    :meth:`needs`, :meth:`bind` and :meth:`from_schedule` as required. ``prop_attn``: add
    ``log(size)`` to the attention
    logits of later blocks once tokens carry sizes (ToMe's proportional attention).
    """

    name: ClassVar[str] = "base"
    # Bumped by a change of the code that changes the method's results: its records and trained
    # artefacts of the version before are then not reused (version 1 is left out of every identity).
    version: ClassVar[int] = 1
    requires_class_token: ClassVar[bool] = False
    prop_attn: bool = False
    # True: run on a CLS-only backbone (the DIST token removed), for the paper's EViT/DynamicViT GFLOPs.
    cls_only_backbone: bool = False
    # True: how many tokens are kept depends on the image (ATS), so GFLOPs are averaged over images.
    image_dependent_cost: ClassVar[bool] = False
    # Conformance checks (``tnt_lightning.testing.CHECKS``) this method is exempt from: check name ->
    # why, in words a reader of the kit's table understands (Random drop: "draws per batch").
    conformance_exceptions: ClassVar[dict[str, str]] = {}

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self.info: BackboneInfo | None = None

    def bind(self, info: BackboneInfo) -> None:
        """Check this method against the backbone and remember what it needs of it.

        Args:
            info: the backbone's facts (:func:`~tnt_lightning.engine.backbone_info`).

        Raises:
            ReductionError: with what was asked, why it cannot be done and what would.
        """
        if self.requires_class_token and not info.has_class_token:
            from .registry import methods_without  # the registry imports this module

            raise ReductionError(
                f"method={self.name} ranks tokens by the CLS token's attention, but this backbone has no "
                f"CLS token (global_pool={info.global_pool!r}); use a CLS-token model (DeiT, vit_mnist) or "
                f"a method that needs none ({', '.join(methods_without('cls_token'))})"
            )
        for loc in self.locations():
            if loc.site is not Site.PRE and not 0 <= loc.block < info.depth:
                raise ReductionError(
                    f"method={self.name} acts {loc}, but the backbone has {info.depth} blocks "
                    f"(0..{info.depth - 1}); choose schedule.blocks within that range"
                )
        self.info = info

    @classmethod
    def from_schedule(
        cls, schedule: str, blocks: list[int], rates: list[float], info: BackboneInfo, **options
    ):
        """The method for a resolved schedule (what ``method=... schedule=...`` builds).

        Args:
            schedule: ``single`` or ``multi``.
            blocks: the blocks it acts at (after, inside or before them, as the method places itself).
            rates: one keep rate per block of ``blocks``.
            info: the backbone's facts, for counts that depend on its patches or depth.
            **options (Any): the method's own options (its ``conf/method/<name>.yaml`` keys).

        Returns:
            method (TokenReducer): the method, not yet bound to a model.
        """
        raise NotImplementedError

    def locations(self) -> list[Location]:
        """Where the method acts in the current mode (``self.training`` may change it).

        Returns:
            The locations, in forward order; the engine calls :meth:`reduce` at each.
        """
        raise NotImplementedError

    def needs(self, block: int) -> AttentionNeeds:
        """What block ``block``'s attention must return for this method.

        Args:
            block: a block index.

        Returns:
            What to return besides the output; nothing by default, so the fused kernel runs.
        """
        return AttentionNeeds()

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        """The method's step: fewer (or merged) tokens at ``loc``.

        Args:
            loc: one of :meth:`locations`.
            tokens: the token state there (prefix first).
            attn: what the block's attention returned for :meth:`needs` (None before block 0).

        Returns:
            The token state the rest of the model runs on, prefix tokens first and unchanged.
        """
        raise NotImplementedError

    def generator(self, device: torch.device) -> torch.Generator:
        """This method's own random generator on ``device``, seeded by ``seed`` (reproducible runs)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def reset_generators(self) -> None:
        """Restart the random draws, so that an evaluation repeats exactly."""
        self._generators.clear()

    def extra_repr(self) -> str:
        return ", ".join(str(loc) for loc in self.locations())
