"""Backbones: timm VisionTransformers, created unchanged, described by a :class:`BackboneSpec`.

A spec is what a ``conf/model/*.yaml`` file instantiates. It names the architecture (a timm
model name, or keyword arguments for timm's ``VisionTransformer``), where the weights come
from, and the backbone-dependent defaults of the paper's pruning schedules.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import ConfigError, UserError
from .conv_stem import EMBED_LAYERS
from .patch_dropout import ContentPatchDropout

WEIGHT_SOURCES = ("hub", "pretrain", "checkpoint", "random")


class WeightsUnavailableError(UserError, RuntimeError):
    """Raised when the weights a run needs cannot be found or downloaded."""


@dataclass
class PruningDefaults:
    """Backbone-dependent defaults of the paper's schedules (docs/methods/conventions.md#block-numbering,
    docs/methods/tnt.md).

    ``single_block``: block index of the single-layer location ("3rd layer" on DeiT = 2, the
    ViT/16 one block earlier). ``similarity_tokens``: s of TNT's and Zero-TP's single-layer
    similarity step (25 DeiT, 30 ViT/16). ``pre_similarity_tokens``: s of TNT's multi-layer
    pre-block step (40). A null value is scaled from the paper's 12-block, 196-patch DeiT to the
    backbone (:meth:`resolved`). ``paper_depth``: when set, the methods' multi-layer blocks
    (written for the paper's 12 blocks) are mapped to the backbone's depth (:meth:`scale_block`).
    """

    single_block: int | None = 2
    similarity_tokens: int | None = 25
    pre_similarity_tokens: int | None = 40
    paper_depth: int | None = None

    def resolved(self, depth: int, num_patches: int) -> PruningDefaults:
        """These defaults with every null filled in for a ``depth``-block, ``num_patches``-patch ViT.

        The paper prunes after the 3rd of 12 blocks and removes 25 (single-layer) / 40 (multi-layer
        pre-block) of 196 tokens by similarity: the same fractions of depth and of the patches.
        """
        return PruningDefaults(
            single_block=self.single_block
            if self.single_block is not None
            else max(0, round(3 * depth / PAPER_DEPTH) - 1),
            similarity_tokens=self.similarity_tokens
            if self.similarity_tokens is not None
            else round(25 * num_patches / PAPER_PATCHES),
            pre_similarity_tokens=self.pre_similarity_tokens
            if self.pre_similarity_tokens is not None
            else round(40 * num_patches / PAPER_PATCHES),
            paper_depth=self.paper_depth,
        )

    def scale_block(self, block: int, depth: int) -> int:
        """Block ``block`` of a ``paper_depth``-block schedule on a ``depth``-block backbone.

        "After block b" keeps its relative depth: the first ``b + 1`` of ``paper_depth`` blocks
        become the first ``round((b + 1) * depth / paper_depth)``.
        """
        if self.paper_depth is None or depth == self.paper_depth:
            return block
        return max(0, round((block + 1) * depth / self.paper_depth) - 1)


# The paper's DeiT: 12 blocks, 14 x 14 patches.
PAPER_DEPTH = 12
PAPER_PATCHES = 196


@dataclass
class BackboneSpec:
    """Everything needed to build a backbone and find its weights.

    Exactly one of ``timm_name`` (a registered timm model) or ``arch`` (keyword arguments of
    timm's ``VisionTransformer``; add ``distilled: true`` for a DIST token) describes it.
    ``weights``: ``hub`` (timm's pretrained weights), ``pretrain`` (trained by this framework as
    ``pretrain`` says, then cached), ``checkpoint`` (no public weights: ``checkpoint`` must be given)
    or ``random``. A ``checkpoint`` file always overrides ``weights``; it is loaded weights-only
    unless ``trust_pickle`` (for a trusted file that pickles other Python objects).
    """

    name: str
    timm_name: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    weights: str = "hub"
    checkpoint: str | None = None
    trust_pickle: bool = False
    release_url: str | None = None
    num_classes: int = 1000
    input_size: tuple[int, int, int] | None = (3, 224, 224)
    preprocess: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.0
    fused_attn: bool = True
    pruning: PruningDefaults = field(default_factory=PruningDefaults)
    pretrain: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.pruning, PruningDefaults):  # a dict, or Hydra's DictConfig
            self.pruning = PruningDefaults(**dict(self.pruning))
        if self.input_size is None:
            if self.timm_name is None:
                raise ValueError(f"model {self.name!r}: model.input_size is required with model.arch")
            self.input_size = timm_input_size(self.timm_name)
        self.input_size = tuple(int(s) for s in self.input_size)
        self.preprocess = dict(self.preprocess)
        self.arch = dict(self.arch)
        self.pretrain = dict(self.pretrain)
        if (self.timm_name is None) == (not self.arch):
            raise ValueError(f"model {self.name!r}: give exactly one of model.timm_name or model.arch")
        if self.weights not in WEIGHT_SOURCES:
            raise ValueError(f"model.weights={self.weights!r} is not one of {list(WEIGHT_SOURCES)}")
        if self.weights == "pretrain" and not self.pretrain:
            raise ValueError(f"model {self.name!r}: model.weights=pretrain needs a model.pretrain section")
        if self.pretrain.get("patch_drop"):
            check_patch_drop(dict(self.pretrain["patch_drop"]))
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate={self.drop_path_rate} must be in [0, 1)")
        if self.num_classes < 1:
            raise ValueError(f"model.num_classes={self.num_classes} must be a positive integer")


def check_timm_name(timm_name: str) -> None:
    """Refuse a name timm does not know, saying how to list the ones it does."""
    if not timm.is_model(timm_name):
        raise ConfigError(
            f"model.timm_name={timm_name!r} is not a timm model; timm.list_models('vit_*') lists "
            f"the VisionTransformers (a pretrained tag may follow: 'vit_base_patch16_224.augreg_in1k')"
        )


def timm_input_size(timm_name: str) -> tuple[int, int, int]:
    """The input size of timm's pretrained configuration for ``timm_name`` (its tag decides).

    Raises:
        ConfigError: timm knows no such model or tag.
    """
    from timm.models import get_pretrained_cfg

    check_timm_name(timm_name)
    try:
        pretrained = get_pretrained_cfg(timm_name)
    except RuntimeError as e:  # an unknown tag
        raise ConfigError(f"model.timm_name={timm_name!r}: {e}") from e
    if pretrained is None or pretrained.input_size is None:
        raise ConfigError(f"model.timm_name={timm_name!r} has no default input size: set model.input_size")
    return tuple(pretrained.input_size)


def check_patch_drop(settings: dict[str, Any]) -> None:
    """Refuse a ``model.pretrain.patch_drop`` that :class:`ContentPatchDropout` would not take, when
    the config is read rather than once the pretraining starts."""
    allowed = ("keep", "content_first")
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"model.pretrain.patch_drop has unknown keys {unknown}; allowed: {list(allowed)}")
    try:
        ContentPatchDropout(patch_size=1, **settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.pretrain.patch_drop: {error}") from error


def create_model(spec: BackboneSpec) -> VisionTransformer:
    """A randomly initialised timm VisionTransformer for ``spec`` (weights are loaded separately).

    Raises :class:`~tnt_lightning.config.ConfigError` for a name timm does not know, an input
    size the model was not built for, or a model the token-reduction engine cannot run.
    """
    kwargs = dict(num_classes=spec.num_classes, drop_path_rate=spec.drop_path_rate)
    if spec.timm_name is not None:
        check_timm_name(spec.timm_name)
        model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    else:
        arch = dict(spec.arch)
        cls = VisionTransformerDistilled if arch.pop("distilled", False) else VisionTransformer
        embed_layer = arch.pop("embed_layer", "patch")
        if embed_layer not in EMBED_LAYERS:
            raise ConfigError(f"model.arch.embed_layer={embed_layer!r} is not one of {list(EMBED_LAYERS)}")
        arch["embed_layer"] = EMBED_LAYERS[embed_layer]
        model = cls(img_size=spec.input_size[1], in_chans=spec.input_size[0], **arch, **kwargs)
    check_engine_support(model, spec)
    set_fused_attn(model, spec.fused_attn)
    return model


# Block and attention classes of timm's vision_transformer that run differently from ``Block``.
_UNSUPPORTED_PARTS = {
    "ResPostBlock": "its blocks normalise after the attention and MLP (res-post-norm)",
    "ParallelScalingBlock": "its blocks run attention and MLP as parallel branches",
    "ParallelThingsBlock": "its blocks run several attention and MLP branches in parallel",
    "DiffParallelScalingBlock": "its blocks run differential attention and MLP in parallel",
    "DiffAttention": "its attention is differential attention (two softmax maps)",
}


def check_engine_support(model: nn.Module, spec: BackboneSpec) -> None:
    """Fail early, naming the model and the reason, where the engine cannot run ``model`` faithfully.

    The engine runs timm's ``Block`` (norm1, attention, layer scale, drop path, norm2, MLP) and
    timm's plain ``Attention`` itself, prunes between them and pools the remaining tokens; any
    other block or attention, an attention-pooling head, or prefix tokens inside the pooling would
    silently compute something else.
    """
    name = spec.timm_name or spec.name

    def fail(reason: str) -> None:
        raise ConfigError(
            f"model {name!r} cannot be served by the token-reduction engine: {reason}. Supported: timm "
            f"VisionTransformers (ViT, DeiT, DeiT III, register-token ViTs) with plain Block/Attention "
            f"layers and CLS-token or average/max pooling"
        )

    if not isinstance(model, VisionTransformer):
        kind = type(model).__name__
        hint = ""
        if "RelPos" in kind or "Beit" in kind:
            hint = " with relative position biases in its attention"
        elif "Eva" in kind:
            hint = " with rotary position embeddings"
        fail(f"it is a {kind}{hint}, not a timm VisionTransformer")
    if getattr(model, "attn_pool", None) is not None:
        fail(f"it pools with an attention head (global_pool={model.global_pool!r})")
    if model.global_pool not in ("token", "avg", "max", "avgmax"):
        fail(f"global_pool={model.global_pool!r} (no pooling)")
    if getattr(model, "pool_include_prefix", False):
        fail("its pooling includes the prefix tokens (pool_include_prefix=True)")
    if not isinstance(model.patch_drop, nn.Identity):
        fail("it drops random patches itself (patch_drop_rate > 0)")
    for index, block in enumerate(model.blocks):
        for part in (block, getattr(block, "attn", None)):
            reason = _UNSUPPORTED_PARTS.get(type(part).__name__)
            if reason is not None:
                fail(reason)
        if type(block) is not Block or type(block.attn) is not Attention:
            fail(
                f"block {index} is a {type(block).__name__} with {type(block.attn).__name__}, "
                f"not timm's Block with Attention"
            )
        if getattr(block.attn, "gate", None) is not None:
            fail("its attention is gated (Attention(gated=True))")
        if not hasattr(block.mlp, "fc1"):
            fail(f"its MLP is a {type(block.mlp).__name__} without an fc1 layer")
    in_chans = getattr(model.patch_embed, "in_chans", None) or model.patch_embed.proj.in_channels
    expected = (in_chans, *model.patch_embed.img_size)
    if not getattr(model, "dynamic_img_size", False) and tuple(spec.input_size) != tuple(expected):
        raise ConfigError(
            f"model {name!r} takes inputs of shape {list(expected)}, but model.input_size="
            f"{list(spec.input_size)}; set model.input_size={list(expected)}"
        )


def set_fused_attn(model: nn.Module, enabled: bool) -> None:
    """Switch timm's fused attention (SDPA) on or off in every attention layer of ``model``."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def load_hub_weights(model: VisionTransformer, spec: BackboneSpec, timeout_s: float = 3.0) -> None:
    """Load timm's pretrained weights for ``spec.timm_name``, failing fast when offline."""
    if spec.timm_name is None:
        raise WeightsUnavailableError(
            f"model {spec.name!r} has no timm hub weights; use model.checkpoint=PATH"
        )
    if not _hub_cached(spec.timm_name) and not _reachable("huggingface.co", 443, timeout_s):
        hint = f" (the release file is {spec.release_url})" if spec.release_url else ""
        raise WeightsUnavailableError(
            f"pretrained weights for {spec.name!r} ({spec.timm_name}) are not in the local cache and the "
            f"timm hub (huggingface.co) cannot be reached from this machine. Download the checkpoint "
            f"elsewhere{hint} and pass it as model.checkpoint=/path/to/file (DeiT release "
            f"{{'model': state_dict}} .pth, timm .pth/.bin or .safetensors). Without weights: data=synthetic "
            f"for a cost-only evaluation (GFLOPs, throughput), or model.weights=random for any task "
            f"(its accuracy and token maps mean nothing; task=visualize also needs "
            f"visualize.allow_random_weights=true)."
        )
    pretrained = timm.create_model(spec.timm_name, pretrained=True, num_classes=spec.num_classes)
    model.load_state_dict(pretrained.state_dict())


def _hub_cached(timm_name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg
    except ImportError:  # pragma: no cover - both ship with timm
        return False
    cfg = get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return True
    return False


def _reachable(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def drop_distillation_token(model: VisionTransformer) -> VisionTransformer:
    """Turn a distilled DeiT into the CLS-only model the paper's EViT/DynamicViT GFLOPs imply.

    In place: the DIST token, its position embedding and ``head_dist`` are removed
    (docs/methods/evit.md#dist-token, docs/methods/dynamicvit.md#dist-token). Only for
    ``paper_flops_compat`` accounting; the result is not a trained model.
    """
    if not isinstance(model, VisionTransformerDistilled):
        return model
    with torch.no_grad():
        model.pos_embed = nn.Parameter(torch.cat([model.pos_embed[:, :1], model.pos_embed[:, 2:]], dim=1))
    del model.dist_token
    del model.head_dist
    model.__class__ = VisionTransformer
    model.num_prefix_tokens = 1
    return model


def count_parameters(model: nn.Module) -> dict[str, float]:
    """Total and trainable parameters, in millions."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params_m": total / 1e6, "trainable_params_m": trainable / 1e6}
