"""``task=train``: train a learned method's parameters for a configuration, once (resuming if
interrupted), and the Lightning fit that :mod:`tnt_lightning.models.trained` (the store of trained
methods) calls when an artefact is missing.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from ..config import epoch_budget
from ..engine import apply_reducer, backbone_info
from ..engine.registry import get_method, learned_methods
from ..errors import ConfigError
from ..lit import LastCheckpoint, OptimConfig, TokenReductionModule
from ..lit.checkpoint import rng_states, set_rng_states
from ..lit.optim import epoch_lr
from ..methods import LearnedReducer
from ..methods.assembly import reducer_for
from ..models import BackboneSpec, check_checkpoint, create_model, load_weight_file, load_weights
from ..models.artefact_io import checksum_problem
from ..models.ddp import Ranks
from ..models.trained import (
    TRAINED_FILE,
    Trained,
    TrainedParametersError,
    TrainFn,
    ensure_trained,
    load_given_trained,
    raise_untrained,
    recipe,
    training_dir,
)
from .common import make_trainer, pretrain_fn

log = logging.getLogger(__name__)


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
    ``workdir/last.ckpt``.

    Returns:
        The trained Lightning module and the training's metrics.
    """
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
    reducer, _ = reducer_for(model, tcfg.method, tcfg.schedule, tcfg.keep_rate, spec.pruning)
    apply_reducer(model, reducer)  # with the DIST token: training never runs on a CLS-only backbone
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
    if module.validated_at_step != trainer.global_step:  # e.g. resumed after its last epoch
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


def trainer_for(cfg: DictConfig, spec: BackboneSpec, loggers: list[Logger] | bool) -> TrainFn:
    """The training the store of trained methods runs when an artefact is missing: :func:`fit`, and
    what of the fitted module the artefact keeps."""

    def train(workdir: Path) -> Trained:
        module, metrics = fit(cfg, spec, workdir, loggers)
        state = {n: p.detach().cpu() for n, p in module.reducer.trainable_parameters()}
        backbone = None
        if module.teacher is not None:  # the backbone was fine-tuned: it is part of the artefact
            weights = module.model.state_dict().items()
            backbone = {k: v.detach().cpu() for k, v in weights if not k.startswith("reducer.")}
        return Trained(state, backbone, metrics)

    return train


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
        reducer, schedule = reducer_for(model, cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning)
        recorder.fields["schedule"] = schedule
        if not isinstance(reducer, LearnedReducer) or not reducer.needs_training():
            learned = cfg.method.name in learned_methods()
            needed = get_method(cfg.method.name).train_overrides if learned else ()
            hint = f" (it trains with {' '.join(needed)})" if needed else ""
            raise ConfigError(
                f"method={cfg.method.name} has nothing to train{hint}; task=train is for "
                f"{', '.join(learned_methods())}"
            )
        reducer.bind(backbone_info(model))
        check_checkpoint(model, spec)  # the given weight files, before any training
        load_given_trained(cfg, spec, reducer)
        path, trained_now = ensure_trained(cfg, spec, reducer, trainer_for(cfg, spec, loggers))
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
