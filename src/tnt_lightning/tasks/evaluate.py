"""``task=eval``: accuracy, GFLOPs, throughput and parameters of a backbone with a method applied."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from timm.models.vision_transformer import VisionTransformer

from ..data import ClassificationDataModule
from ..errors import ConfigError
from ..lit import ImageClassifier
from ..lit.timing import WallTimeSplit
from ..measure import (
    TimedModel,
    base_key,
    count_gflops,
    mean_gflops,
    measure_throughput,
    same_process_speedup,
    unpruned,
)
from ..measure.reliability import judge_speedup
from ..methods import LearnedReducer
from ..methods.assembly import attach, reducer_for
from ..models import BackboneSpec, count_parameters, create_model, load_weights
from ..models.ddp import Ranks
from ..models.trained import load_given_trained, provide_trained
from ..results import results_path
from .common import format_summary, job_loggers, log_summary, make_trainer, pretrain_fn, resolve_device
from .records import RunRecorder
from .train import check_can_provide, trainer_for

log = logging.getLogger(__name__)


def check_data_fits_model(datamodule: ClassificationDataModule, spec: BackboneSpec) -> None:
    if datamodule.has_labels and datamodule.num_classes != spec.num_classes:
        raise ConfigError(
            f"data={datamodule.name} has {datamodule.num_classes} classes but model={spec.name} has "
            f"model.num_classes={spec.num_classes}"
        )
    data_shape = getattr(datamodule, "input_size", None)
    if data_shape is not None and tuple(data_shape) != tuple(spec.input_size):
        raise ConfigError(
            f"data={datamodule.name} gives inputs of shape {tuple(data_shape)} but model={spec.name} "
            f"expects model.input_size={list(spec.input_size)}"
        )


def first_images(datamodule: ClassificationDataModule, count: int) -> Iterator[torch.Tensor]:
    """The first ``count`` images of the test split (set up by the test pass), one at a time."""
    seen = 0
    for images, _ in datamodule.test_dataloader():
        taken = images[: count - seen]
        yield from taken
        seen += len(taken)
        if seen >= count:
            return


def build_pruned_model(
    cfg: DictConfig,
    spec: BackboneSpec,
    has_labels: bool,
    loggers: list[Logger],
    recorder: RunRecorder,
    trace_sources: bool = False,
) -> VisionTransformer:
    """The backbone with its weights and the configured method (trained parameters included).

    A method that cannot run on this backbone failed before the run (``preflight.py``); one that
    would need training that is switched off, or whose ``method.checkpoint`` is unusable, fails
    before any weights load (or a backbone is pretrained).
    Without labels (cost-only runs) learned methods stay untrained.
    """
    torch.manual_seed(cfg.seed)  # model.weights=random: the run's seed draws them, so a rerun repeats
    model = create_model(spec)
    reducer, schedule = reducer_for(model, cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning)
    recorder.fields["schedule"] = schedule
    if schedule["name"] != "none" and schedule.get("rates") is None:  # driven by its own knob (ToMe's r)
        recorder.fields["keep_rate"] = None
    learned = isinstance(reducer, LearnedReducer) and reducer.needs_training() and has_labels
    given = None
    if learned:
        given = load_given_trained(cfg, spec, reducer)
        check_can_provide(cfg, spec, reducer)
    pretrain = pretrain_fn(cfg)
    weights, extra = load_weights(model, spec, cfg.paths.cache_dir, has_labels, pretrain, Ranks(cfg.trainer))
    recorder.details["weights"] = weights
    if learned:
        if given is not None and "backbone" in given:  # its fine-tuned backbone replaces the weights
            load_given_trained(cfg, spec, reducer, model)
        provided = given or provide_trained(cfg, spec, reducer, extra, trainer_for(cfg, spec, loggers), model)
        recorder.details["method_weights"] = provided
    elif isinstance(reducer, LearnedReducer) and reducer.needs_training():
        recorder.details["method_weights"] = "untrained (cost-only run)"
    return attach(model, reducer, trace_sources)  # weights first: a CLS-only backbone drops DIST


def measure_speed(
    cfg: DictConfig, spec: BackboneSpec, model: VisionTransformer, recorder: RunRecorder
) -> None:
    """Throughput with the configured protocol and, unless ``measure.speedup_pairs=0``, the
    speedup over the unpruned backbone timed in this process (``measure/speedup.py``)."""
    m = cfg.measure
    device = resolve_device(m.device)
    timed = TimedModel(model, device, m.dtype, m.compile)
    tp = measure_throughput(
        timed,
        spec.input_size,
        batch_size=m.batch_size,
        warmup=m.warmup,
        iters=m.iters,
        mode=m.throughput_mode,
        repeats=m.repeats,
    )
    recorder.metrics["throughput_img_s"] = tp["throughput_img_s"]
    recorder.details["throughput"] = tp
    if m.speedup_pairs == 0 or cfg.method.name == "none":
        return
    model_config = OmegaConf.to_container(cfg.model, resolve=True)
    key = base_key(model_config, device, m.batch_size, m.dtype, m.compile)
    base, base_gflops = unpruned(key, lambda: create_model(spec), spec.input_size, device, m.dtype, m.compile)
    sp = same_process_speedup(timed, base, spec.input_size, m.batch_size, m.iters, m.speedup_pairs, m.warmup)
    recorder.metrics["speedup"] = sp["speedup"]
    gflops = recorder.metrics.get("gflops")
    if gflops:
        recorder.metrics["gflops_ratio"] = base_gflops / gflops
        recorder.metrics["speedup_over_flops_limit"] = sp["speedup"] / recorder.metrics["gflops_ratio"]
    trust = judge_speedup(sp["pairs"], recorder.metrics.get("gflops_ratio"), m.speedup_bound)
    recorder.metrics["speedup_reliable"] = trust["reliable"]
    recorder.details["speedup"] = {**sp, "base_gflops": base_gflops, **trust, "bound": m.speedup_bound}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one configuration and append its record; returns the record."""
    recorder = RunRecorder(cfg, keep_rate=1.0 if cfg.method.name == "none" else cfg.keep_rate)
    with recorder, job_loggers(cfg) as loggers:
        spec: BackboneSpec = instantiate(cfg.model)
        datamodule: ClassificationDataModule = instantiate(cfg.data)
        if datamodule.has_labels:
            datamodule.check(("test",))
        check_data_fits_model(datamodule, spec)
        recorder.details["preprocessing"] = datamodule.preprocessing_record()

        model = build_pruned_model(cfg, spec, datamodule.has_labels, loggers, recorder)
        recorder.metrics.update(count_parameters(model))

        image_dependent = getattr(model, "reducer", None) is not None and model.reducer.image_dependent_cost
        if cfg.measure.gflops and not (image_dependent and datamodule.has_labels):
            recorder.metrics["gflops"] = count_gflops(model, spec.input_size)
            if image_dependent:
                recorder.details["gflops_over"] = "one random input (cost-only run)"
        if datamodule.has_labels:
            split = WallTimeSplit()
            trainer = make_trainer(cfg, loggers, enable_checkpointing=False, callbacks=[split])
            # verbose=False: Lightning's metric box repeats what the summary prints (verbose=true keeps it)
            classifier = ImageClassifier(model, datamodule.num_classes)
            trainer.test(classifier, datamodule=datamodule, verbose=bool(cfg.verbose))
            recorder.details["time_split"] = split.split
            accuracy = classifier.accuracy("test")
            recorder.metrics.update(acc1=accuracy["acc1"], acc5=accuracy["acc5"])
            recorder.details["images_evaluated"] = accuracy["images"]
            recorder.details["correct"] = {"top1": accuracy["correct_1"], "top5": accuracy["correct_5"]}
            if getattr(datamodule, "bad_images", 0):  # data.on_bad_image=skip left these out
                recorder.details["bad_images"] = datamodule.bad_images
                recorder.details["bad_image_paths"] = [str(p) for p in datamodule.bad_image_paths]
            if cfg.measure.gflops and image_dependent:
                counted = mean_gflops(model, first_images(datamodule, cfg.measure.gflops_images))
                recorder.metrics["gflops"] = counted.pop("mean")
                recorder.details["gflops_over"] = {"held_out_images": counted.pop("images"), **counted}
        if cfg.measure.throughput:
            measure_speed(cfg, spec, model, recorder)
        log_summary(loggers, {**recorder.metrics, "keep_rate": recorder.fields["keep_rate"]})
    print(format_summary(recorder.record))
    print(f"  results: {results_path(cfg.paths.results_dir)}")
    return recorder.record
