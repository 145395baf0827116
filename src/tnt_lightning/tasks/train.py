"""Training learned methods, once per trained artefact (``task=train``, and on demand for ``task=eval``).

A trained artefact is identified by what determines it: the method's training options
(:meth:`LearnedReducer.training_key`: a TNT allocator does not depend on the keep rate, a
DynamicViT predictor does), the backbone and its weights, the data, the recipe and the seed. It
lives in ``<cache_dir>/methods/<method>-<model>-<hash>/``: ``last.ckpt`` (Lightning, for resuming
a killed run) while training, then ``trained.pth`` (only the trained parameters, with that
identity; with ``method.train.backbone_lr_scale`` > 0 also the fine-tuned backbone, which
loading applies). A file lock lets one job train while concurrent jobs wait, then load; the
ranks of a DDP job train it together, as their rank 0 decides (:mod:`tnt_lightning.ddp`), and
their number is part of the identity when there are several.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import ConfigError, UserError, epoch_budget
from ..ddp import Ranks, train_once
from ..engine import apply_reducer, backbone_info
from ..engine.registry import learned_methods
from ..lit import LastCheckpoint, OptimConfig, TokenReductionModule
from ..lit.checkpoint import rng_states, set_rng_states
from ..lit.optim import epoch_lr
from ..methods import LearnedReducer, build_reducer
from ..models import (
    BackboneSpec,
    check_checkpoint,
    create_model,
    load_backbone_state,
    load_weight_file,
    load_weights,
    pretrained_path,
    reuse_cached,
    save_artefact,
    state_dict_of,
)
from ..models.artefact_io import adopt_legacy, checksum_matches, checksum_problem
from ..results.identity import data_identity, legacy_data_identity
from .common import make_trainer, pretrain_fn

log = logging.getLogger(__name__)

TRAINED_FILE = "trained.pth"
# What a trained.pth holds, checked when one without a checksum (an older version's) is reused.
TRAINED_KEYS = ("method", "model", "identity", "state_dict")
# Recipe keys that do not change the trained parameters.
RECIPE_VOLATILE = ("auto", "val_keep_rate")


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


def check_schedule_reaches_lr(cfg: DictConfig) -> None:
    """Refuse a recipe whose epochs are not a count or a fraction, or whose lr never leaves its
    warm-up value.

    ``schedule: epoch`` steps the lr once per epoch as DeiT's loop with timm 0.3.2 does
    (:func:`~tnt_lightning.lit.optim.epoch_lr`), where the first two epochs both train at
    ``warmup_lr``: with 1 or 2 epochs (the embedded study's budget) a training would run entirely
    at ``warmup_lr`` (1e-6) and learn nothing."""
    rec = recipe(cfg)
    epochs, _ = epoch_budget(rec)
    if rec.get("schedule") != "epoch":
        return
    optim = OptimConfig(lr=float(rec.base_lr), warmup_epochs=rec.warmup_epochs, warmup_lr=rec.warmup_lr)
    if max(epoch_lr(optim, e, epochs) for e in range(epochs)) <= optim.warmup_lr:
        raise ConfigError(
            f"method={cfg.method.name}: method.train.schedule=epoch with epochs={epochs} and "
            f"warmup_epochs={rec.warmup_epochs} trains every step at warmup_lr={rec.warmup_lr} (the lr is "
            f"stepped per epoch, and epochs 0 and 1 both run at warmup_lr): use schedule=step (per-step "
            f"warm-up and cosine), more than 2 epochs, or warmup_epochs=0"
        )


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
    cfg: DictConfig, spec: BackboneSpec, reducer: LearnedReducer, legacy: bool = False
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


def training_folder(
    cfg: DictConfig, spec: BackboneSpec, reducer: LearnedReducer, legacy: bool = False
) -> Path:
    """The folder named by ``reducer``'s trained identity (``legacy``: by the identity before the
    data counted by content)."""
    blob = json.dumps(training_identity(cfg, spec, reducer, legacy), sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return Path(cfg.paths.cache_dir).expanduser() / "methods" / f"{reducer.name}-{spec.name}-{key}"


def training_dir(cfg: DictConfig, spec: BackboneSpec, reducer: LearnedReducer) -> Path:
    """The folder of ``reducer``'s trained artefact; one trained under the older identity is adopted
    into it first (:func:`~tnt_lightning.models.artefact_io.adopt_legacy`), not trained again."""
    path = training_folder(cfg, spec, reducer)
    adopt_legacy(path, training_folder(cfg, spec, reducer, legacy=True), artefact=TRAINED_FILE)
    return path


def training_config(cfg: DictConfig) -> DictConfig:
    """The config of the reducer that trains: the run's, except that validation during training
    prunes as ``train.val_keep_rate`` says (TNT: single-layer at K = 0.5; its heads serve every K)."""
    val_rate = recipe(cfg).get("val_keep_rate")
    if val_rate is None:
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.keep_rate = val_rate
    cfg.schedule = {"name": "single", "blocks": None, "rates": None}
    return cfg


def fit(
    cfg: DictConfig, spec: BackboneSpec, workdir: Path, loggers: list[Logger] | bool
) -> tuple[TokenReductionModule, dict]:
    """Train the method's parameters (and the backbone, if the recipe fine-tunes it), resuming from
    ``workdir/last.ckpt``."""
    check_schedule_reaches_lr(cfg)
    rec = recipe(cfg)
    L.seed_everything(cfg.seed, workers=True)
    train_spec = dataclasses.replace(spec, drop_path_rate=float(rec.drop_path))
    model = create_model(train_spec)
    # A backbone pretrained just now (a cache miss) draws from the same generators: the method's
    # initial parameters and training draws must be those of a run that found it cached.
    rng = rng_states()
    load_weights(model, train_spec, cfg.paths.cache_dir, True, pretrain_fn(cfg), Ranks(cfg.trainer))
    set_rng_states(rng)
    tcfg = training_config(cfg)
    reducer, _ = build_reducer(tcfg.method, tcfg.schedule, tcfg.keep_rate, spec.pruning, backbone_info(model))
    apply_reducer(model, reducer)
    datamodule = instantiate(cfg.data)
    datamodule.batch_size = int(rec.batch_size)
    datamodule.check(("fit", "validate"))
    checkpoints = LastCheckpoint(workdir)
    max_epochs, fraction = epoch_budget(rec)
    limits = {"limit_train_batches": train_batch_limit(cfg, fraction)} if fraction < 1.0 else {}
    trainer = make_trainer(
        cfg,
        loggers,
        max_epochs=max_epochs,
        **limits,
        callbacks=[checkpoints],
        enable_checkpointing=True,
        default_root_dir=str(workdir),
    )
    total_batch = int(rec.batch_size) * trainer.world_size * trainer.accumulate_grad_batches
    lr = float(rec.base_lr) * total_batch / rec.lr_batch if rec.lr_batch else float(rec.base_lr)
    optim = OptimConfig(
        lr=lr,
        weight_decay=rec.weight_decay,
        warmup_epochs=rec.warmup_epochs,
        warmup_lr=rec.warmup_lr,
        min_lr=rec.min_lr,
        schedule=rec.schedule,
    )
    module = TokenReductionModule(
        model,
        datamodule.num_classes,
        optim,
        label_smoothing=rec.label_smoothing,
        mixup=rec.mixup,
        cutmix=rec.cutmix,
        backbone_lr_scale=backbone_lr_scale(rec),
    )
    start = checkpoints.resume_point()
    if start is not None:
        log.warning(
            "resuming %s training from epoch %d of %d (step %d, %s)",
            reducer.name,
            start["epochs_done"],
            max_epochs,
            start["global_step"],
            checkpoints.path,
        )
    ckpt_path = str(checkpoints.path) if start is not None else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    accuracy = module.accuracy("val")
    metrics = {
        "val_acc1": accuracy["acc1"],
        "val_acc1_full": accuracy["acc1_full"],
        "lr": lr,
        "total_batch": total_batch,
        "epochs": rec.epochs,
        "resumed_from_epoch": start["epochs_done"] if start is not None else None,
        "resumed_from_step": start["global_step"] if start is not None else None,
    }
    return module, metrics


def train_batch_limit(cfg: DictConfig, fraction: float) -> int | float:
    """Lightning's ``limit_train_batches`` for a recipe of a fraction of an epoch, applied to what
    ``trainer.limit_train_batches`` already limits (a count or a fraction of the batches)."""
    given = cfg.trainer.get("limit_train_batches")
    if given is None:
        return fraction
    if isinstance(given, int) and not isinstance(given, bool):
        return max(1, int(given * fraction))
    return float(given) * fraction


def backbone_lr_scale(rec: DictConfig) -> float:
    """The recipe's backbone lr as a fraction of the method's (0: frozen backbone)."""
    scale = float(rec.get("backbone_lr_scale") or 0.0)
    if scale < 0:
        raise ConfigError(f"method.train.backbone_lr_scale={scale} must be >= 0 (0: frozen backbone)")
    return scale


def ensure_trained(
    cfg: DictConfig,
    spec: BackboneSpec,
    reducer: LearnedReducer,
    loggers: list[Logger] | bool = False,
    may_train: bool = True,
) -> tuple[Path, bool]:
    """The trained artefact for ``reducer``'s configuration, training it first if it is missing or
    damaged (a checksum mismatch, or an old file without one that does not load).

    Returns its path and whether this call trained it. With ``may_train`` false, a missing or
    damaged artefact raises :class:`TrainedParametersError` instead (and is left in place).
    """
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
        module, metrics = fit(cfg, spec, workdir, loggers)
        if rank_zero_only.rank != 0:  # the other DDP ranks trained with it; rank 0 saves
            return
        artefact = {
            "method": reducer.name,
            "model": spec.name,
            "identity": training_identity(cfg, spec, reducer),
            "state_dict": {n: p.detach().cpu() for n, p in module.reducer.trainable_parameters()},
            "metrics": metrics,
        }
        if module.teacher is not None:  # the backbone was fine-tuned: it is part of the artefact
            artefact["backbone"] = {
                k: v.detach().cpu()
                for k, v in module.model.state_dict().items()
                if not k.startswith("reducer.")
            }
        save_artefact(artefact, final)
        (workdir / "last.ckpt").unlink(missing_ok=True)
        log.info("trained %s: %s", reducer.name, metrics)

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
    reducer: LearnedReducer,
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
    cfg: DictConfig, spec: BackboneSpec, reducer: LearnedReducer, model: nn.Module | None = None
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


def load_state(reducer: LearnedReducer, state: dict[str, torch.Tensor], source: str) -> None:
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
    reducer: LearnedReducer,
    extra: dict[str, torch.Tensor],
    loggers: list[Logger] | bool,
    model: nn.Module,
) -> dict[str, Any]:
    """Give ``reducer`` its trained parameters (and ``model`` its fine-tuned backbone, if they were
    trained with one), from (in order) ``method.checkpoint``, the method tensors of
    ``model.checkpoint``, the cache, or a training run if ``method.train.auto``."""
    given = load_given_trained(cfg, spec, reducer, model)
    if given is not None:
        return given
    if any(k in reducer.state_dict() for k in extra):
        load_state(reducer, extra, f"model.checkpoint={spec.checkpoint}")
        return {"source": f"model.checkpoint:{spec.checkpoint}"}
    path, trained = ensure_trained(cfg, spec, reducer, loggers, may_train=bool(recipe(cfg).auto))
    info = load_trained(reducer, path, spec, source=f"cached trained parameters {path}", model=model)
    info["trained_now"] = trained
    return info


def raise_untrained(cfg: DictConfig, reducer: LearnedReducer, path: Path) -> None:
    looked = f"{path}, which is damaged" if path.exists() else str(path)
    raise TrainedParametersError(
        f"method={reducer.name} has no trained parameters for this configuration (looked for {looked}) and "
        f"method.train.auto=false: run task=train with the same settings first, set method.train.auto=true, "
        f"or give trained parameters as method.checkpoint=PATH"
    )


def check_can_provide(cfg: DictConfig, spec: BackboneSpec, reducer: LearnedReducer) -> None:
    """Fail before any weights load if evaluation would need training that is switched off (the
    cached artefact is missing, or does not match its checksum), or training on a backbone with
    random weights: that one runs only when asked for, as ``task=train``."""
    if cfg.method.get("checkpoint") or spec.checkpoint:
        return
    path = training_dir(cfg, spec, reducer) / TRAINED_FILE
    if path.is_file() and checksum_problem(path) is None:
        return
    if not recipe(cfg).auto:
        raise_untrained(cfg, reducer, path)
    check_schedule_reaches_lr(cfg)
    if spec.weights == "random":
        raise TrainedParametersError(
            f"method={reducer.name} would first be trained, {recipe(cfg).epochs} epochs, on model="
            f"{spec.name} with random weights (model.weights=random), which gives meaningless heads: give "
            f"the backbone weights (model.checkpoint=PATH), or train on it on purpose with task=train "
            f"(same overrides) first"
        )


def train(cfg: DictConfig) -> dict[str, Any]:
    """``task=train``: train the method's parameters for this configuration (resuming if interrupted)."""
    from ..results import results_path
    from .common import format_summary, job_loggers, log_summary
    from .records import RunRecorder

    recorder = RunRecorder(cfg, task="train")  # train_eval's training half is a train record
    with recorder, job_loggers(cfg) as loggers:
        spec: BackboneSpec = instantiate(cfg.model)
        model = create_model(spec)
        reducer, schedule = build_reducer(
            cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, backbone_info(model)
        )
        recorder.fields["schedule"] = schedule
        if not isinstance(reducer, LearnedReducer):
            raise ConfigError(
                f"method={cfg.method.name} has nothing to train; task=train is for "
                f"{', '.join(learned_methods())}"
            )
        reducer.bind(backbone_info(model))
        check_checkpoint(model, spec)  # the given weight files, before any training
        load_given_trained(cfg, spec, reducer)
        path, trained_now = ensure_trained(cfg, spec, reducer, loggers)
        saved = load_weight_file(path, f"cached trained parameters {path}")
        recorder.details.update(trained=str(path), trained_now=trained_now, training=saved["metrics"])
        # where this run's training started: a killed run's rerun resumes from its last.ckpt
        resumed = saved["metrics"].get("resumed_from_epoch")
        recorder.details["resumed_from_epoch"] = resumed if trained_now else None
        recorder.metrics.update(
            acc1=saved["metrics"]["val_acc1"], acc1_full=saved["metrics"]["val_acc1_full"]
        )
        if not trained_now:
            log.info("%s was already trained for this configuration: %s", reducer.name, path)
        log_summary(loggers, recorder.metrics)
    print(format_summary(recorder.record))
    print(f"  trained parameters: {path}\n  results: {results_path(cfg.paths.results_dir)}")
    return recorder.record
