"""The store of trained methods: each learned method's trained parameters, trained once per
configuration and reused by every run that needs them (the pattern of the backbone provider,
:mod:`.provider`: an identity, a file lock, a checksum, resumable training).

A trained artefact is identified by what determines it (``results/identity.py`` says which data
keys): the method's training options (its ``training_key()``: a TNT allocator does not depend on
the keep rate, a DynamicViT predictor does), the backbone and its weights, the data, the recipe,
the seed, and the number of training processes when there are several. It lives in
``<cache_dir>/methods/<method>-<model>-<hash>/``: ``last.ckpt`` (Lightning, for resuming a killed
run) while training, then ``trained.pth`` (only the trained parameters, with that identity; with
``method.train.backbone_lr_scale`` > 0 also the fine-tuned backbone, which loading applies). A file
lock lets one job train while concurrent jobs wait, then load; the ranks of a DDP job train it
together, as their rank 0 decides (:mod:`.ddp`). The training itself is the caller's
(:data:`TrainFn`: ``tasks/train.py`` fits the Lightning module).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..errors import ConfigError, UserError
from ..results.identity import data_identity, legacy_data_identity
from .artefact_io import adopt_legacy, checksum_matches, load_weight_file, reuse_cached, save_artefact
from .backbones import BackboneSpec
from .checkpoint import load_backbone_state, state_dict_of
from .ddp import Ranks, this_rank, train_once
from .provider import pretrained_path

log = logging.getLogger(__name__)

TRAINED_FILE = "trained.pth"
# What a trained.pth holds, checked when one without a checksum (an older version's) is reused.
TRAINED_KEYS = ("method", "model", "identity", "state_dict")
# Recipe keys that do not change the trained parameters.
RECIPE_VOLATILE = ("auto", "val_keep_rate")


class Trainable(Protocol):
    """What the store needs of a learned method (``methods/learned.py``'s ``LearnedReducer``)."""

    name: str
    version: int

    def training_key(self) -> dict[str, Any]: ...

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any: ...


@dataclass
class Trained:
    """What a training hands to the store: the method's trained tensors, the fine-tuned backbone's
    (None: it stayed frozen), and the training's metrics."""

    state_dict: dict[str, torch.Tensor]
    backbone: dict[str, torch.Tensor] | None
    metrics: dict[str, Any]


# Trains the method in the given work folder (resuming from its last.ckpt) on every rank.
TrainFn = Callable[[Path], Trained]


class TrainedParametersError(UserError, RuntimeError):
    """Trained parameters are missing, or were trained for something else."""


def recipe(cfg: DictConfig) -> DictConfig:
    """The method's training recipe, with the dataset's ``train_overrides`` applied.

    ``data.train_overrides`` holds recipe keys for every method, and optionally a mapping named
    after a method with keys for that method only (applied last).
    """
    if "train" not in cfg.method:
        raise ConfigError(f"method={cfg.method.name} has no training recipe (method.train)")
    overrides = OmegaConf.select(cfg, "data.train_overrides") or OmegaConf.create({})
    common = {k: v for k, v in overrides.items() if not OmegaConf.is_dict(v)}
    unknown = set(common) - set(cfg.method.train)
    if unknown:
        raise ConfigError(
            f"data.train_overrides sets {sorted(unknown)}, which are not recipe keys; "
            f"allowed: {sorted(cfg.method.train)}, or a mapping named after a method"
        )
    return OmegaConf.merge(cfg.method.train, common, overrides.get(cfg.method.name) or {})


def backbone_identity(
    spec: BackboneSpec, cache_dir: str, world_size: int = 1, legacy: bool = False
) -> dict[str, Any]:
    if spec.checkpoint:
        path = Path(spec.checkpoint).expanduser()
        return {"name": spec.name, "checkpoint": str(path.resolve()), "bytes": path.stat().st_size}
    if spec.weights == "pretrain":
        return {"name": spec.name, "pretrain": pretrained_path(spec, cache_dir, world_size, legacy).name}
    return {"name": spec.name, "weights": spec.weights, "timm_name": spec.timm_name}


def training_identity(
    cfg: DictConfig, spec: BackboneSpec, reducer: Trainable, legacy: bool = False
) -> dict[str, Any]:
    """What determines ``reducer``'s trained parameters (``results/identity.py`` says which data keys);
    ``legacy``: the identity of artefacts trained before the data counted by content."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data = (legacy_data_identity if legacy else data_identity)(data, "trained")
    rec = {
        k: v for k, v in OmegaConf.to_container(recipe(cfg), resolve=True).items() if k not in RECIPE_VOLATILE
    }
    if not rec.get("backbone_lr_scale"):  # a frozen backbone: the key of artefacts trained before it existed
        rec.pop("backbone_lr_scale", None)
    world_size = Ranks(cfg.trainer).world_size
    identity = {
        "method": reducer.training_key(),
        "backbone": backbone_identity(spec, cfg.paths.cache_dir, world_size, legacy),
        "data": data,
        "recipe": rec,
        "seed": cfg.seed,
    }
    if world_size > 1:  # one process: the identity of artefacts trained before DDP counted
        identity["world_size"] = world_size
    if reducer.version != 1:  # the first version: the identity of artefacts trained before versions
        identity["method_version"] = reducer.version
    return identity


def training_folder(cfg: DictConfig, spec: BackboneSpec, reducer: Trainable, legacy: bool = False) -> Path:
    """The folder named by ``reducer``'s trained identity (``legacy``: by the identity before the
    data counted by content)."""
    blob = json.dumps(training_identity(cfg, spec, reducer, legacy), sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return Path(cfg.paths.cache_dir).expanduser() / "methods" / f"{reducer.name}-{spec.name}-{key}"


def training_dir(cfg: DictConfig, spec: BackboneSpec, reducer: Trainable) -> Path:
    """The folder of ``reducer``'s trained artefact; one trained under the older identity is adopted
    into it first (:func:`~tnt_lightning.models.artefact_io.adopt_legacy`), not trained again."""
    path = training_folder(cfg, spec, reducer)
    adopt_legacy(path, training_folder(cfg, spec, reducer, legacy=True), artefact=TRAINED_FILE)
    return path


def ensure_trained(
    cfg: DictConfig,
    spec: BackboneSpec,
    reducer: Trainable,
    train: TrainFn | None = None,
) -> tuple[Path, bool]:
    """The trained artefact for ``reducer``'s configuration, training it first (``train``) if it is
    missing or damaged (a checksum mismatch, or an old file without one that does not load).

    Args:
        cfg: the run's config.
        spec: the backbone.
        reducer: the learned method, built for the backbone.
        train: trains it in the given work folder (resuming from its ``last.ckpt``); None: it may
            not be trained here, and a missing or damaged artefact raises
            :class:`TrainedParametersError` instead (and is left in place).

    Returns:
        Its path, and whether this call trained it.
    """
    may_train = train is not None
    workdir = training_dir(cfg, spec, reducer)
    final = workdir / TRAINED_FILE
    ranks = Ranks(cfg.trainer)
    if checksum_matches(final) and not ranks.shared:
        return final, False
    workdir.mkdir(parents=True, exist_ok=True)

    def reuse() -> bool:
        if reuse_cached(final, "cached trained parameters", TRAINED_KEYS, remove_damaged=may_train):
            log.info("using trained %s %s (checked while holding its lock)", reducer.name, final)
            return True
        return False

    def train_and_save() -> None:
        log.warning(
            "training %s once on %s (%s), %s epochs, before this run goes on (the progress bar shows "
            "the time per epoch); it will be cached at %s",
            reducer.name,
            spec.name,
            cfg.data.name,
            recipe(cfg).epochs,
            final,
        )
        result = train(workdir)
        if this_rank() != 0:  # the other DDP ranks trained with it; rank 0 saves
            return
        artefact = {
            "method": reducer.name,
            "model": spec.name,
            "identity": training_identity(cfg, spec, reducer),
            "state_dict": result.state_dict,
            "metrics": result.metrics,
        }
        if result.backbone is not None:  # the backbone was fine-tuned: it is part of the artefact
            artefact["backbone"] = result.backbone
        save_artefact(artefact, final)
        (workdir / "last.ckpt").unlink(missing_ok=True)
        log.info("trained %s: %s", reducer.name, result.metrics)

    trained = train_once(
        ranks,
        Path(str(workdir) + ".lock"),
        workdir,
        reuse,
        train_and_save,
        refuse=lambda: raise_untrained(cfg, reducer, final),
        saved=lambda: checksum_matches(final),
        may_train=may_train,
    )
    return final, trained


def load_trained(
    reducer: Trainable,
    path: str | Path,
    spec: BackboneSpec | None = None,
    source: str | None = None,
    trust_pickle: bool = False,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Load trained parameters: ours (``trained.pth``) or an official checkpoint (TNT, DynamicViT).

    Ours are checked against the method and backbone they were trained for; official ones by key
    names and shapes. ``source`` names a cache file; without it the file is the user's
    ``method.checkpoint``, which ``trust_pickle`` (``method.trust_pickle``) may let unpickle
    objects. A file trained with a fine-tuned backbone (``backbone_lr_scale`` > 0) holds that
    backbone too, loaded into ``model`` when one is given (its pretrained weights already loaded).
    Returns what the file says about itself.
    """
    path = Path(path).expanduser()
    trust_key = "method.trust_pickle" if source is None else None
    source = source or f"method.checkpoint={path}"
    obj = load_weight_file(path, source, trust_key, trust_pickle)
    if isinstance(obj, dict) and "identity" in obj:
        if obj.get("method") != reducer.name:
            raise TrainedParametersError(
                f"{source} holds parameters of method={obj.get('method')}, not {reducer.name}"
            )
        if spec is not None and obj.get("model") != spec.name:
            raise TrainedParametersError(f"{source} was trained on model={obj.get('model')}, not {spec.name}")
        trained_for = obj["identity"].get("method") if isinstance(obj["identity"], dict) else None
        if trained_for != reducer.training_key():
            raise TrainedParametersError(
                f"{source} was trained with {trained_for}, but this run needs {reducer.training_key()}"
            )
        load_state(reducer, state_dict_of(obj.get("state_dict"), source), source)
        info = {"source": str(path), "metrics": obj.get("metrics", {})}
        if "backbone" in obj:
            info["backbone"] = "fine-tuned with the method (from this file)"
            if model is not None:
                load_backbone_state(model, state_dict_of(obj["backbone"], source), f"{source} (backbone)")
        return info
    load_state(reducer, state_dict_of(obj, source), f"{source} (official checkpoint)")
    return {"source": f"official:{path}"}


def load_given_trained(
    cfg: DictConfig, spec: BackboneSpec, reducer: Trainable, model: nn.Module | None = None
) -> dict[str, Any] | None:
    """Load ``method.checkpoint`` into ``reducer`` if one is given (None if not).

    It needs no backbone weights, so tasks call it first (without ``model``): an unusable file
    fails before any pretraining or weight loading. A file that holds a fine-tuned backbone is
    loaded again with ``model`` once the pretrained weights are in.
    """
    path = cfg.method.get("checkpoint")
    if not path:
        return None
    trust = bool(cfg.method.get("trust_pickle", False))
    return load_trained(reducer, path, spec, trust_pickle=trust, model=model)


def load_state(reducer: Trainable, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the method's tensors of ``state`` (other keys, such as a backbone's, are ignored)."""
    own = reducer.state_dict()
    mine = {k: v for k, v in state.items() if k in own}
    needed = [n for n, _ in reducer.trainable_parameters()]
    missing = [k for k in needed if k not in mine]
    if missing:
        raise TrainedParametersError(
            f"{source} has no trained parameters for method={reducer.name} (missing {missing[:3]} ...)"
        )
    for k, v in mine.items():
        if v.shape != own[k].shape:
            raise TrainedParametersError(
                f"{source} does not fit this backbone: {k} has shape {tuple(v.shape)}, the method expects "
                f"{tuple(own[k].shape)} (was it trained for another backbone?)"
            )
    reducer.load_state_dict(mine, strict=False)


def provide_trained(
    cfg: DictConfig,
    spec: BackboneSpec,
    reducer: Trainable,
    extra: dict[str, torch.Tensor],
    train: TrainFn,
    model: nn.Module,
) -> dict[str, Any]:
    """Give ``reducer`` its trained parameters (and ``model`` its fine-tuned backbone, if they were
    trained with one), from (in order) ``method.checkpoint``, the method tensors of
    ``model.checkpoint``, the cache, or ``train`` if ``method.train.auto``."""
    given = load_given_trained(cfg, spec, reducer, model)
    if given is not None:
        return given
    if any(k in reducer.state_dict() for k in extra):
        load_state(reducer, extra, f"model.checkpoint={spec.checkpoint}")
        return {"source": f"model.checkpoint:{spec.checkpoint}"}
    path, trained = ensure_trained(cfg, spec, reducer, train if recipe(cfg).auto else None)
    info = load_trained(reducer, path, spec, source=f"cached trained parameters {path}", model=model)
    info["trained_now"] = trained
    return info


def raise_untrained(cfg: DictConfig, reducer: Trainable, path: Path) -> None:
    looked = f"{path}, which is damaged" if path.exists() else str(path)
    raise TrainedParametersError(
        f"method={reducer.name} has no trained parameters for this configuration (looked for {looked}) and "
        f"method.train.auto=false: run task=train with the same settings first, set method.train.auto=true, "
        f"or give trained parameters as method.checkpoint=PATH"
    )
