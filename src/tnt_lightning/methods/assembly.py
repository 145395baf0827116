"""The one way a pruned model is put together, from a composed config or from Python arguments.

Putting a method into a timm ViT is three steps, always in this order: the method is built for the
backbone (:func:`~tnt_lightning.methods.build_reducer` resolves its schedule from the backbone's
facts), a distilled DeiT loses its DIST token when the method runs on a CLS-only backbone (the
paper's EViT/DynamicViT GFLOPs), and the method is plugged in, which checks it against the backbone
(:func:`~tnt_lightning.engine.apply_reducer` binds it: once). A task that loads weights between
the first step and the last (the DIST token must still be there) calls :func:`reducer_for` and
:func:`attach` itself; everything else calls :func:`pruned_model` or :func:`prune`.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from timm.models.vision_transformer import VisionTransformer

from ..engine import TokenReducer, apply_reducer, backbone_info
from ..engine.registry import BASELINE, get_method
from ..models.backbones import PruningDefaults, drop_distillation_token
from . import build_reducer

# A timm model has no model config: every backbone default is scaled from the paper's DeiT to it.
SCALED_DEFAULTS = PruningDefaults(single_block=None, similarity_tokens=None, pre_similarity_tokens=None)


def reducer_for(
    model: VisionTransformer, method: DictConfig, schedule: DictConfig, keep_rate: float, pruning: Any
) -> tuple[TokenReducer | None, dict[str, Any]]:
    """The configured method built for ``model`` (None for ``method=none``), and its schedule's record.

    Args:
        model: the backbone, before any DIST token is dropped.
        method: the ``method`` config node.
        schedule: the ``schedule`` config node.
        keep_rate: the run's keep rate.
        pruning: the backbone's schedule defaults (``model.pruning``).

    Returns:
        The method (not yet bound) and the resolved schedule, as a run records it.
    """
    return build_reducer(method, schedule, keep_rate, pruning, backbone_info(model))


def attach(
    model: VisionTransformer, reducer: TokenReducer | None, trace_sources: bool = False
) -> VisionTransformer:
    """Plug ``reducer`` into ``model`` in place, on the CLS-only backbone if it asks for one.

    Args:
        model: the backbone with its weights loaded.
        reducer: from :func:`reducer_for`; None leaves the model as it is.
        trace_sources: record which patches every kept token stands for (``model.last_trace``).

    Returns:
        ``model``.
    """
    if reducer is None:
        return model
    if reducer.cls_only_backbone:
        drop_distillation_token(model)
    return apply_reducer(model, reducer, trace_sources=trace_sources)


def prune_with(
    model: VisionTransformer,
    method: DictConfig,
    schedule: DictConfig,
    keep_rate: float,
    pruning: Any,
    trace_sources: bool = False,
) -> tuple[VisionTransformer, dict[str, Any]]:
    """:func:`reducer_for` then :func:`attach`: the core both entry points share.

    Args:
        model: the backbone, pruned in place.
        method: the ``method`` config node.
        schedule: the ``schedule`` config node.
        keep_rate: the keep rate.
        pruning: the backbone's schedule defaults.
        trace_sources: as in :func:`attach`.

    Returns:
        ``model`` with the method plugged in, and the resolved schedule's record.
    """
    reducer, record = reducer_for(model, method, schedule, keep_rate, pruning)
    return attach(model, reducer, trace_sources), record


def pruned_model(
    cfg: DictConfig, model: VisionTransformer | None = None, trace_sources: bool = False
) -> tuple[VisionTransformer, dict[str, Any]]:
    """The model a composed run config describes, with its method plugged in.

    Args:
        cfg: a composed config (``model``, ``method``, ``schedule``, ``keep_rate``).
        model: the backbone to prune in place; None builds ``cfg.model``'s (its configured weights
            are not loaded: a task loads them, a cost count does not need them).
        trace_sources: as in :func:`attach`.

    Returns:
        The pruned model and the resolved schedule's record.
    """
    from hydra.utils import instantiate

    from ..models import create_model

    spec = instantiate(cfg.model)
    model = create_model(spec) if model is None else model
    return prune_with(model, cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, trace_sources)


def method_config(name: str, seed: int = 0, paper_flops_compat: bool = False, **options: Any) -> DictConfig:
    """Method ``name``'s config (its ``conf/method`` YAML, the project's or a declared plugin's) with
    ``options`` set, as a run composes it.

    Args:
        name: a registered method name.
        seed: the run's ``seed`` (a method config may interpolate it).
        paper_flops_compat: the run's ``paper_flops_compat`` (likewise).
        **options: values for keys of the method's config.

    Returns:
        The ``method`` config node, as ``run.py method=<name> method.<key>=<value>`` composes it.

    Raises:
        KeyError: ``name`` is not a registered method.
        TypeError: an option the method's config does not have.
    """
    from ..config import config_dir
    from ..plugins import config_dirs

    get_method(name)
    found = [d / "method" / f"{name}.yaml" for d in (config_dir(), *config_dirs())]
    defaults = OmegaConf.load(next(f for f in found if f.is_file()))
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"method {name!r} has no option {unknown}; its options: {sorted(defaults)}")
    root = OmegaConf.create({"seed": seed, "paper_flops_compat": paper_flops_compat, "method": defaults})
    return OmegaConf.merge(root, {"method": options}).method


def prune(
    model: VisionTransformer,
    method: str,
    keep_rate: float = 0.5,
    *,
    schedule: str = "single",
    blocks: list[int] | None = None,
    rates: list[float] | None = None,
    seed: int = 0,
    paper_flops_compat: bool = False,
    pruning: PruningDefaults | None = None,
    trace_sources: bool = False,
    **options: Any,
) -> VisionTransformer:
    """Plug a registered method into a timm ViT in place, as ``run.py method=<method>`` would.

    Args:
        model: a timm ``VisionTransformer`` (its weights are kept; a learned method's parameters
            start untrained).
        method: a registered name (``python -m tnt_lightning.methods`` lists them), or ``none``.
        keep_rate: the keep rate (single-layer, or every multi-layer location).
        schedule: ``single`` or ``multi``.
        blocks: where it acts; None: the method's paper locations for this backbone.
        rates: multi-layer only, one keep rate per location.
        seed: the method's own random draws.
        paper_flops_compat: the paper's CLS-only accounting (EViT, DynamicViT, dTPS).
        pruning: backbone defaults (single-layer block, similarity tokens); None scales the
            paper's DeiT values to this backbone's depth and patches.
        trace_sources: record which patches every kept token stands for (``model.last_trace``).
        **options: the method's own options (``method.<key>`` in a run: ``r=8`` for ToMe).

    Returns:
        ``model``, pruned.
    """
    if method == BASELINE:
        return model
    method_cfg = method_config(method, seed=seed, paper_flops_compat=paper_flops_compat, **options)
    schedule_cfg = OmegaConf.create({"name": schedule, "blocks": blocks, "rates": rates})
    pruning = SCALED_DEFAULTS if pruning is None else pruning
    return prune_with(model, method_cfg, schedule_cfg, keep_rate, pruning, trace_sources)[0]
