"""Token-reduction methods, each a small module the engine plugs into a timm ViT.

Every module of this folder is imported here (its ``@register_method`` classes register, and are
named here: ``tnt_lightning.methods.TopK``), so a new method is one module in this folder plus its
``conf/method/<name>.yaml``, nothing else. ``build_reducer`` turns the ``method``/``schedule``/
``keep_rate`` config into a method instance.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ..engine import BackboneInfo, ReductionError, TokenReducer
from ..models.backbones import PruningDefaults
from .common.learned import LearnedReducer
from .common.staged import StagedReducer

# Keys of a method config that are not constructor options: its schedule defaults, and for learned
# methods where trained parameters come from and how they are trained.
NON_OPTION_KEYS = (
    "_target_",
    "name",
    "version",
    "single_block",
    "multi_blocks",
    "checkpoint",
    "trust_pickle",
    "train",
)
# The modules of this folder that hold no method: what methods share, the assembly path, the CLI.
NOT_METHODS = ("common", "assembly", "__main__")


def resolve_blocks(
    method: DictConfig, schedule: DictConfig, keep_rate: float, pruning: PruningDefaults, depth: int
):
    """The blocks and per-block rates a schedule asks for (the defaults when null:
    docs/methods/conventions.md#block-numbering).

    A method's own default blocks are the paper's, for 12 blocks: on a backbone whose
    ``model.pruning.paper_depth`` is set they keep their relative depth (``scale_block``).
    """
    single_block = pruning.single_block
    if schedule.name == "single":
        if schedule.rates is not None:
            raise ReductionError("schedule=single takes keep_rate, not schedule.rates (use schedule=multi)")
        default = method.get("single_block")
        blocks = (
            list(schedule.blocks)
            if schedule.blocks is not None
            else [single_block if default is None else pruning.scale_block(default, depth)]
        )
        if len(blocks) != 1:
            raise ReductionError(
                f"schedule=single acts at one block, got schedule.blocks={blocks}; use schedule=multi"
            )
        return blocks, [keep_rate]
    default = method.get("multi_blocks")
    if schedule.blocks is not None:
        blocks = list(schedule.blocks)
    elif default is not None:
        blocks = [pruning.scale_block(b, depth) for b in default]
        if len(set(blocks)) != len(blocks):
            raise ReductionError(
                f"method={method.name}'s blocks {list(default)} (for {pruning.paper_depth} blocks) "
                f"collide on this {depth}-block backbone ({blocks}); give schedule.blocks"
            )
    else:
        blocks = list(range(depth))
    if schedule.rates is None:
        return blocks, [keep_rate] * len(blocks)
    rates = [float(r) for r in schedule.rates]
    if len(rates) != len(blocks):
        raise ReductionError(
            f"schedule.rates={rates} has {len(rates)} rates but method={method.name} acts at {len(blocks)} "
            f"locations {blocks}; give one rate per location (or override schedule.blocks)"
        )
    return blocks, rates


def build_reducer(
    method: DictConfig, schedule: DictConfig, keep_rate: float, pruning: Any, info: BackboneInfo
) -> tuple[TokenReducer | None, dict[str, Any]]:
    """The configured method (None for ``method=none``) and a record of its resolved schedule.

    Method options left null take the backbone's defaults (``model.pruning``: similarity_tokens,
    pre_similarity_tokens).
    """
    if method.name == "none":
        return None, {"name": "none"}
    pruning = pruning.resolved(info.depth, info.num_patches)
    blocks, rates = resolve_blocks(method, schedule, keep_rate, pruning, info.depth)
    options = {
        k: v for k, v in OmegaConf.to_container(method, resolve=True).items() if k not in NON_OPTION_KEYS
    }
    for key, value in list(options.items()):
        if value is None and hasattr(pruning, key):
            options[key] = getattr(pruning, key)
    reducer = get_class(method._target_).from_schedule(schedule.name, blocks, rates, info, **options)
    record = {"name": schedule.name, "blocks": blocks, "rates": rates}
    record.update({k: v for k, v in options.items() if k != "seed"})
    if hasattr(reducer, "resolved_schedule"):  # a method that runs other blocks than the schedule names
        record.update(reducer.resolved_schedule())
    return reducer, record


def _import_methods() -> dict[str, type[TokenReducer]]:
    """Import every method module of this folder; its method classes, by class name."""
    found: dict[str, type[TokenReducer]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in NOT_METHODS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.update(
            {
                name: obj
                for name, obj in vars(module).items()
                if isinstance(obj, type)
                and issubclass(obj, TokenReducer)
                and obj.__module__ == module.__name__
            }
        )
    return found


METHOD_CLASSES = _import_methods()
globals().update(METHOD_CLASSES)
__all__ = ["LearnedReducer", "NON_OPTION_KEYS", "StagedReducer", "build_reducer", *sorted(METHOD_CLASSES)]
