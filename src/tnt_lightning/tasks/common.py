"""Pieces every task uses: loggers, trainers, devices, the backbone pretraining recipe, summaries."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..lit import ImageClassifier, LastCheckpoint, OptimConfig
from ..lit.estimate import TrainingTimeEstimate
from ..models import BackboneSpec
from ..models.patch_dropout import ContentPatchDropout

log = logging.getLogger(__name__)


def wandb_run_fields(cfg: DictConfig, logger_cfg: DictConfig) -> dict[str, Any]:
    """Name and tags of a job's W&B run, so the UI can filter and colour runs with no custom code."""
    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
        return {}
    task = getattr(cfg.task, "value", cfg.task)  # a Task enum in the structured config
    tags = [
        f"method:{cfg.method.name}",
        f"model:{cfg.model.name}",
        f"schedule:{cfg.schedule.name}",
        f"data:{cfg.data.name}",
        f"task:{task}",
        *cfg.tags,
    ]
    name = f"{task}-{cfg.model.name}"
    if task != "pretrain":  # a pretraining prunes nothing: no method, no keep rate
        name += f"-{cfg.method.name}" + ("" if cfg.method.name == "none" else f"-K{cfg.keep_rate}")
    return {"name": name, "tags": tags, "job_type": task}


@contextlib.contextmanager
def job_loggers(cfg: DictConfig) -> Iterator[list[Logger]]:
    """The run's loggers (W&B offline by default, and a local CSV copy), finished on exit.

    Enter the run's recorder first: a logger that fails to start then still leaves a record.

    Finishing matters: in one process a second ``wandb.init`` without ``wandb.finish`` silently
    returns the same run, so a multirun would log every job into the first job's run.
    """
    loggers = [
        instantiate(c, **wandb_run_fields(cfg, c)) for c in (cfg.logger or {}).values() if c is not None
    ]
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    try:
        yield loggers
    finally:
        for logger in loggers:
            close_logger(logger)


def close_logger(logger: Logger) -> None:
    """Finish one logger; a logger that cannot close (W&B's service killed by a requeue, say) is
    reported, never allowed to turn a finished run into a failed one."""
    try:
        if isinstance(logger, WandbLogger):
            import wandb

            if wandb.run is not None:
                run_folder = Path(wandb.run.dir).parent
                wandb.finish()
                log.info("W&B run folder: %s", run_folder)
        else:
            logger.finalize("success")
    except Exception as e:
        where = getattr(logger, "save_dir", None) or getattr(logger, "log_dir", None)
        log.warning(
            "%s did not close cleanly (%s: %s); its files are in %s",
            type(logger).__name__,
            type(e).__name__,
            e,
            where,
        )


@rank_zero_only  # on other DDP ranks a logger's experiment is a stand-in without a summary
def log_summary(loggers: list[Logger], metrics: dict[str, Any]) -> None:
    """Log the run's final metrics (scalars only) to every logger, and to W&B's run summary."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for logger in loggers:
        logger.log_metrics(scalars)
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(scalars)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_trainer(cfg: DictConfig, loggers: list[Logger] | bool = False, **overrides: Any) -> L.Trainer:
    """The configured Lightning trainer, with the framework's progress: the epoch out of the total
    on the bar, and a logged estimate of a training's duration once its first steps are timed."""
    overrides["callbacks"] = [*overrides.get("callbacks", []), TrainingTimeEstimate()]
    if cfg.trainer.get("enable_progress_bar", True):
        from .quiet import epoch_of_total_bar

        overrides["callbacks"] = [*overrides.get("callbacks", []), epoch_of_total_bar()]
    return instantiate(cfg.trainer, logger=loggers, **overrides)


def pretrain_fn(cfg: DictConfig, loggers: list[Logger] | bool = False):
    """The recipe that trains a small backbone from scratch (``model.pretrain``), for the cache.

    ``task=pretrain`` passes its loggers (loss, lr and validation curves go to its W&B run); a
    pretraining that another task triggers logs to the console only, so that the job's own run does
    not get two trainings' steps on one axis."""

    def pretrain(model: VisionTransformer, spec: BackboneSpec, workdir: Path | None = None) -> dict[str, Any]:
        """Train ``model`` in place; with a ``workdir``, keep ``last.ckpt`` there every epoch and
        resume from it (the caller deletes the folder once the weights are cached)."""
        recipe = OmegaConf.create(spec.pretrain)
        L.seed_everything(recipe.seed, workers=True)
        # The caller built the model before seeding: redraw its initial weights from the seed, so
        # that the cached backbone is the same on every machine.
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        model.init_weights()
        datamodule = instantiate(recipe.data)
        datamodule.check(("fit", "validate"))
        module = ImageClassifier(
            model, datamodule.num_classes, OptimConfig(**recipe.optim), label_smoothing=recipe.label_smoothing
        )
        checkpoints = [LastCheckpoint(workdir)] if workdir is not None else []
        start = checkpoints[0].resume_point() if checkpoints else None
        if start is not None:
            log.warning(
                "resuming backbone %s pretraining from epoch %d of %d (%s)",
                spec.name,
                start["epochs_done"],
                recipe.epochs,
                checkpoints[0].path,
            )
        # Patch dropout (models/patch_dropout.py): every step sees a random share of the patch
        # tokens, on some steps the ones with content first, so that the backbone learns to
        # classify from the token sets the methods will feed it; each step is cheaper too.
        drop_hook = None
        if recipe.get("patch_drop"):
            drop = OmegaConf.to_container(recipe.patch_drop)
            model.patch_drop = ContentPatchDropout(
                model.patch_embed.patch_size[0], num_prefix_tokens=model.num_prefix_tokens, **drop
            )
            drop_hook = model.register_forward_pre_hook(
                lambda _, args: model.patch_drop.observe(args[0]) if model.training else None
            )
        trainer = make_trainer(
            cfg,
            loggers,
            max_epochs=recipe.epochs,
            callbacks=checkpoints,
            enable_checkpointing=bool(checkpoints),
            check_val_every_n_epoch=recipe.epochs,
            gradient_clip_val=recipe.get("gradient_clip_val"),
        )
        ckpt_path = str(checkpoints[0].path) if start is not None else None
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        finally:
            if drop_hook is not None:
                drop_hook.remove()
                model.patch_drop = nn.Identity()
        if module.validated_at_step != trainer.global_step:  # patch dropout is off in validation
            trainer.validate(module, datamodule=datamodule, verbose=False)
        model.cpu().eval()
        accuracy = module.accuracy("val")
        return {
            "val_acc1": accuracy["acc1"],
            "val_acc5": accuracy["acc5"],
            "epochs": recipe.epochs,
            "resumed_from_epoch": start["epochs_done"] if start is not None else None,
        }

    return pretrain


PAPER_PASSES = (50, 30)  # warm-up and timed passes of the paper's throughput protocol


def format_summary(record: dict[str, Any]) -> str:
    """The few lines a person reads at the end of a run."""
    m = record["metrics"]
    parts = []
    for key, label in (("acc1", "top-1"), ("acc5", "top-5"), ("acc1_full", "top-1 with all tokens")):
        if m.get(key) is not None:
            parts.append(f"{label} {m[key]:.2f}%")
    if m.get("gflops") is not None:
        parts.append(f"GFLOPs {m['gflops']:.4g}")
    if m.get("throughput_img_s") is not None:
        tp = record["details"]["throughput"]
        protocol = tp["mode"]  # "paper" only when it is the paper's 50 + 30 passes (measure=quick is not)
        if protocol == "paper" and (tp["warmup"], tp["iters"]) != PAPER_PASSES:
            protocol = f"{tp['warmup']} warm-up + {tp['iters']} timed passes"
        parts.append(
            f"throughput {m['throughput_img_s']:.1f} img/s ({protocol}, batch {tp['batch_size']}, "
            f"{tp['device']}, {tp['threads']} threads)"
        )
    if m.get("speedup") is not None:
        sp = record["details"]["speedup"]
        trust = "" if sp.get("reliable", True) else f", unreliable: {sp['why']}"
        parts.append(f"speedup {m['speedup']:.2f}x (pairs spread {sp.get('spread', 0):.0%}{trust})")
    if m.get("params_m") is not None:
        parts.append(f"params {m['params_m']:.3f}M")
    split = record["details"].get("time_split")
    if split:
        seconds = f"data {split['data_s']:.1f}, model {split['model_s']:.1f}, other {split['overhead_s']:.1f}"
        parts.append(f"evaluated in {split['wall_s']:.1f} s ({seconds}: {split['bound']}-bound)")
    knob = f"keep_rate={record['keep_rate']}"
    if record["keep_rate"] is None and (record.get("schedule") or {}).get("r") is not None:
        knob = f"r={record['schedule']['r']}"
    head = f"{record['task']}: {record['model']} / {record['method']} ({knob}) on {record['data']}"
    status = "" if record["status"] == "ok" else f"  [{record['status']}: {record['error']['message']}]"
    lines = [head + status, "  " + "  ".join(parts)] if parts else [head + status]
    return "\n".join([*lines, f"  run {record['run_id']}"])
