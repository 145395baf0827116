"""``task=pretrain``: train a small backbone from scratch and store it in the train-once cache."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from ..errors import ConfigError
from ..models import BackboneSpec, count_parameters, ensure_pretrained
from ..models.ddp import Ranks
from ..results import results_path
from .common import format_summary, job_loggers, log_summary, pretrain_fn
from .records import RunRecorder


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """(Re)train ``model`` as its ``pretrain`` recipe says and cache the weights."""
    recorder = RunRecorder(cfg, keep_rate=1.0)
    with recorder, job_loggers(cfg) as loggers:
        spec: BackboneSpec = instantiate(cfg.model)
        if not spec.pretrain:
            raise ConfigError(
                f"model={spec.name} has no pretrain recipe (model.pretrain); task=pretrain trains the "
                f"small offline backbones (vit_mnist, vit_mnist_meanpool)"
            )
        check_recipe_data(spec, cfg)
        metrics: dict[str, Any] = {}

        def train_and_keep(model, spec_, workdir):
            metrics.update(pretrain_fn(cfg, loggers)(model, spec_, workdir))
            recorder.metrics.update(count_parameters(model))
            return metrics

        path = ensure_pretrained(spec, cfg.paths.cache_dir, train_and_keep, True, Ranks(cfg.trainer))
        recorder.details["weights"] = str(path)
        recorder.details["resumed_from_epoch"] = metrics.get("resumed_from_epoch")
        recorder.metrics.update(acc1=metrics["val_acc1"], acc5=metrics["val_acc5"])
        log_summary(loggers, recorder.metrics)
    print(format_summary(recorder.record))
    print(f"  weights: {path}\n  results: {results_path(cfg.paths.results_dir)}")
    return recorder.record


def check_recipe_data(spec: BackboneSpec, cfg: DictConfig) -> None:
    """A backbone whose recipe names its own data (vit_mnist: MNIST) refuses to be recorded as
    trained on another ``data``; ``model=vit_scratch`` trains on the configured one."""
    recipe_target = (spec.pretrain.get("data") or {}).get("_target_")
    if recipe_target and recipe_target != cfg.data.get("_target_"):
        raise ConfigError(
            f"model={spec.name} is pretrained on its own data ({recipe_target.rsplit('.', 1)[-1]}, "
            f"model.pretrain.data), not data={cfg.data.name}: use model=vit_scratch (or vit_scratch_small) "
            f"to pretrain a backbone on data={cfg.data.name}"
        )
