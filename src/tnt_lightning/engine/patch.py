"""Plugging a :class:`~.reducer.TokenReducer` into an unmodified timm VisionTransformer.

Like ToMe's timm patch, :func:`apply_reducer` swaps the model's class for a subclass whose
forward runs the blocks one by one and calls the method at its locations. The modules, the
weights and the state-dict keys stay timm's (the method's own parameters live under
``reducer.``), so any timm checkpoint loads unchanged, and :func:`remove_reducer` restores the
original class. timm's ``set_grad_checkpointing`` keeps working: each block's backbone parts are
checkpointed (the method's own steps between them are not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import (
    attend,
    attend_with_probs,
    attention_probs,
    official_rounding,
    official_rounding_enabled,
)
from .reducer import AttentionInfo, AttentionNeeds, BackboneInfo, Location, Site, TokenReducer
from .tokens import Tokens

T = TypeVar("T")


def backbone_info(model: VisionTransformer) -> BackboneInfo:
    """The facts about ``model`` that schedules and checks depend on, read from the model itself
    (so that any timm ViT works, not only the configured ones).

    Args:
        model: a timm ``VisionTransformer``.

    Returns:
        Its depth, widths, prefix tokens, patches, CLS and DIST tokens and pooling.
    """
    block = model.blocks[0]
    return BackboneInfo(
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_heads=block.attn.num_heads,
        mlp_hidden=block.mlp.fc1.out_features,
        num_prefix=model.num_prefix_tokens,
        num_patches=model.patch_embed.num_patches,
        has_class_token=model.cls_token is not None,
        distilled=isinstance(model, VisionTransformerDistilled),
        global_pool=model.global_pool,
    )


class TokenReductionMixin:
    """The forward pass of a ViT with a token reducer. Mixed into the model's own class."""

    reducer: TokenReducer
    grad_checkpointing: bool  # timm's, set by set_grad_checkpointing()
    reduction_enabled: bool = True
    trace_sources: bool = False
    # Token state after the last forward (sizes, sources, policy): pooling and visualisation read it.
    last_tokens: Tokens | None = None
    # (location, source matrix after that step) for every step of the last forward, when tracing.
    last_trace: list[tuple[Location, Tensor]]

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if not self.reduction_enabled:
            self.last_tokens = None
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token reduction does not combine with an external attention mask")
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        reducer = self.reducer
        active = set(reducer.locations())
        tokens = Tokens.start(x, self.num_prefix_tokens, trace=self.trace_sources)
        self.last_trace = []
        pre = Location(Site.PRE)
        if pre in active:
            tokens = self._reduce(pre, tokens, None)
        for index, block in enumerate(self.blocks):
            tokens = self._run_block(index, block, tokens, active)
        self.last_tokens = tokens
        return self.norm(tokens.x)

    def _reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        tokens = self.reducer.reduce(loc, tokens, attn)
        if tokens.source is not None:
            self.last_trace.append((loc, tokens.source))
        return tokens

    def _run_block(self, index: int, block: Block, tokens: Tokens, active: set[Location]) -> Tokens:
        inside, after = Location(Site.INSIDE, index), Location(Site.AFTER, index)
        needs = self.reducer.needs(index)
        probs = None
        if Location(Site.AHEAD, index) in active:
            tokens, probs = self._reduce_ahead(index, block, tokens)
        bias = self._size_bias(tokens)
        if probs is None and inside not in active and not needs and tokens.policy is None:
            tokens = tokens.with_x(self._backbone_step(block, tokens.x, attn_mask=bias))
            return self._reduce(after, tokens, None) if after in active else tokens

        if probs is None:
            x, attn = self._backbone_step(_attention_residual, block, tokens.x, needs, bias, tokens.policy)
        else:
            x, attn = self._backbone_step(_given_attention_residual, block, tokens.x, probs), AttentionInfo()
        tokens = tokens.with_x(x)
        if inside in active:
            tokens = self._reduce(inside, tokens, attn)
        x = self._backbone_step(_mlp_residual, block, tokens.x)
        tokens = tokens.with_x(x)
        return self._reduce(after, tokens, attn) if after in active else tokens

    def _size_bias(self, tokens: Tokens) -> Tensor | None:
        """[B, 1, 1, N] ``log(size)`` for the attention logits (proportional attention), or None."""
        if self.reducer.prop_attn and tokens.size is not None:
            return tokens.size.log().transpose(1, 2).unsqueeze(1)
        return None

    def _reduce_ahead(self, index: int, block: Block, tokens: Tokens) -> tuple[Tokens, Tensor | None]:
        """The method's step before block ``index``'s attention (``Site.AHEAD``): it gets the
        block's probabilities on the tokens before the step in ``attn.probs`` and leaves there the
        attention the block applies to the reduced tokens, or None for the block to compute it.

        Returns:
            The reduced tokens, and the probabilities to apply (or None).
        """
        probs = self._backbone_step(_attention_probs, block, tokens.x, self._size_bias(tokens))
        given = AttentionInfo(probs=probs)
        tokens = self._reduce(Location(Site.AHEAD, index), tokens, given)
        return tokens, given.probs

    def _backbone_step(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, checkpointed when timm's ``set_grad_checkpointing`` asked for
        it (as timm's own forward checkpoints its blocks). Only backbone steps are: a method's step
        may keep state, which a recomputation in backward would change. The recomputation runs
        under the forward's :func:`official_rounding`, which ``backward()`` is usually outside of."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return fn(*args, **kwargs)
        rounding = official_rounding_enabled()

        def run(*a: Any, **kw: Any) -> T:
            with official_rounding(rounding):
                return fn(*a, **kw)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        tokens = self.last_tokens
        weighted = tokens is not None and (tokens.size is not None or tokens.policy is not None)
        if self.global_pool != "avg" or not weighted:
            return super().forward_head(x, pre_logits=pre_logits)
        # Mean pooling over what the tokens stand for: merged tokens by their size (ToMe's MAE
        # patch), masked-out tokens not at all (DynamicViT training).
        p = self.num_prefix_tokens
        weight = tokens.patch_sizes()
        if tokens.policy is not None:
            weight = weight * tokens.policy[:, p:]
        pooled = (x[:, p:] * weight).sum(dim=1) / weight.sum(dim=1)
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    @contextlib.contextmanager
    def reduction_disabled(self) -> Iterator[None]:
        """Run the unreduced backbone inside this block (teacher passes, full-token accuracy)."""
        previous = self.reduction_enabled
        self.reduction_enabled = False
        try:
            yield
        finally:
            self.reduction_enabled = previous


def _attention_residual(
    block: Block, x: Tensor, needs: AttentionNeeds, bias: Tensor | None, policy: Tensor | None
) -> tuple[Tensor, AttentionInfo]:
    """timm's ``x + drop_path1(ls1(attn(norm1(x))))``, with what the method reads of the attention."""
    out, attn = attend(block.attn, block.norm1(x), needs, bias, policy)
    return x + block.drop_path1(block.ls1(out)), attn


def _attention_probs(block: Block, x: Tensor, bias: Tensor | None) -> Tensor:
    """Block's attention probabilities on ``norm1(x)``, queries and keys only."""
    return attention_probs(block.attn, block.norm1(x), bias)


def _given_attention_residual(block: Block, x: Tensor, probs: Tensor) -> Tensor:
    """``x + drop_path1(ls1(attn(norm1(x))))`` with the attention probabilities given."""
    return x + block.drop_path1(block.ls1(attend_with_probs(block.attn, block.norm1(x), probs)))


def _mlp_residual(block: Block, x: Tensor) -> Tensor:
    """timm's ``x + drop_path2(ls2(mlp(norm2(x))))``."""
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


_CLASSES: dict[type, type] = {}


def _reducing_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"TokenReducing{cls.__name__}", (TokenReductionMixin, cls), {})
    return _CLASSES[cls]


def apply_reducer(
    model: VisionTransformer, reducer: TokenReducer, trace_sources: bool = False
) -> VisionTransformer:
    """Plug ``reducer`` into ``model`` in place (checking it against the backbone first).

    The model's weights and its class's own code stay; its class becomes a subclass with the
    reducing forward, so that timm's methods and ``state_dict`` keys are unchanged.

    Args:
        model: a timm ``VisionTransformer`` (a DIST token already dropped where the method asks).
        reducer: the method; bound here, so a method that cannot run on this backbone fails now.
        trace_sources: record which patches every kept token stands for (``model.last_trace``).

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a timm ``VisionTransformer``.
        ReductionError: the method cannot run on this backbone (the message says what would).
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"token reduction needs a timm VisionTransformer, got {type(model).__name__}")
    reducer.bind(backbone_info(model))
    reducer.train(model.training)
    if not isinstance(model, TokenReductionMixin):
        model.__class__ = _reducing_class(type(model))
    model.reducer = reducer
    model.trace_sources = trace_sources
    model.last_trace = []
    return model


def remove_reducer(model: VisionTransformer) -> TokenReducer:
    """Undo :func:`apply_reducer`: the model runs unpruned again, as its own class.

    Args:
        model: a model :func:`apply_reducer` changed.

    Returns:
        The reducer it had.

    Raises:
        ValueError: the model has no reducer.
    """
    if not isinstance(model, TokenReductionMixin):
        raise ValueError("this model has no reducer")
    reducer = model.reducer
    del model.reducer
    model.__class__ = next(
        c
        for c in type(model).__mro__[1:]
        if issubclass(c, VisionTransformer) and not issubclass(c, TokenReductionMixin)
    )
    for attr in ("trace_sources", "last_trace", "last_tokens"):
        model.__dict__.pop(attr, None)
    return reducer
