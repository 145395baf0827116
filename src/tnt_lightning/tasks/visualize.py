"""``task=visualize``: token maps of a method on a few images (the paper's Figure 3), saved as a PNG.

Built like ``task=eval`` (same backbone, weights, method and trained parameters), but the method
runs with source tracing on a handful of images picked by ``seed``; the figure shows which patches
each reduction step dropped or merged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig
from torch import Tensor

from ..data import ClassificationDataModule, ImageFolderDataModule, MNISTDataModule
from ..data.mnist import MNIST_MEAN, MNIST_STD
from ..errors import ConfigError
from ..models import BackboneSpec
from .common import format_summary, job_loggers
from .evaluate import build_pruned_model, check_data_fits_model
from .records import RunRecorder
from .token_maps import draw_token_maps, patch_owners, to_rgb

log = logging.getLogger(__name__)

STEPS = ("all", "final")
# visualize.split -> the data module's stage that sets that split up
SPLITS = {"val": "validate", "train": "fit"}


def check_settings(cfg: DictConfig) -> None:
    """Fail before any data is read or model built if ``visualize.*`` or the method cannot be drawn."""
    settings = cfg.visualize
    problems = [
        (
            isinstance(settings.num_images, int) and settings.num_images >= 1,
            "visualize.num_images",
            settings.num_images,
            "an integer >= 1",
        ),
        (settings.steps in STEPS, "visualize.steps", settings.steps, f"one of {list(STEPS)}"),
        (settings.split in SPLITS, "visualize.split", settings.split, f"one of {list(SPLITS)}"),
        (
            cfg.method.name != "none",
            "method",
            cfg.method.name,
            "a token-reduction method (method=none drops and merges nothing to show)",
        ),
    ]
    for ok, key, value, allowed in problems:
        if not ok:
            raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def image_stats(datamodule: ClassificationDataModule) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the data module normalised its images with, to draw them back in colour."""
    if isinstance(datamodule, MNISTDataModule):
        return (MNIST_MEAN,), (MNIST_STD,)
    if isinstance(datamodule, ImageFolderDataModule):
        return datamodule.mean, datamodule.std
    raise ConfigError(
        f"data={datamodule.name} is not allowed for task=visualize: it holds no images to draw; "
        f"use data=mnist, imagefolder or imagenet"
    )


def select_images(
    datamodule: ClassificationDataModule, split: str, num_images: int, seed: int
) -> tuple[Tensor, list[int]]:
    """``num_images`` images of ``split`` picked at random by ``seed`` (a larger count adds images)."""
    datamodule.setup(SPLITS[split])
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    dataset = loader.dataset
    if num_images > len(dataset):
        log.warning("the %s split has only %d images; drawing all of them", split, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    indices = order[:num_images].tolist()
    return torch.stack([dataset[i][0] for i in indices]), indices


def announce_training(cfg: DictConfig, spec: BackboneSpec) -> None:
    """A learned method is trained before it can be drawn: say so, with its epochs, and refuse it on a
    backbone with random weights (its maps would show nothing) unless ``visualize.allow_random_weights``."""
    if "train" not in cfg.method:
        return
    from ..models.trained import recipe

    epochs = recipe(cfg).epochs
    random_weights = spec.weights == "random" and not spec.checkpoint
    if random_weights and not cfg.visualize.get("allow_random_weights", False):
        raise ConfigError(
            f"task=visualize method={cfg.method.name} would first train {cfg.method.name} for {epochs} "
            f"epochs on model={spec.name} with random weights (model.weights=random), whose token maps "
            f"mean nothing: give weights (model.checkpoint=PATH), or visualize.allow_random_weights=true"
        )
    log.warning(
        "task=visualize needs a trained %s: unless it is already in %s, it trains first, %d epochs "
        "(method.train.epochs; as long as task=train method=%s)",
        cfg.method.name,
        Path(cfg.paths.cache_dir) / "methods",
        epochs,
        cfg.method.name,
    )


def weights_label(weights: str) -> str:
    """What the figure's title says about weights that are not the named model's release."""
    if weights.startswith("random"):
        return " (random weights)"
    if weights.startswith("checkpoint:"):
        return f" (weights: {Path(weights.split(':', 1)[1]).name})"
    return ""


def describe(cfg: DictConfig, schedule: dict[str, Any]) -> str:
    """The figure's title: model, method, where it acts and how much it keeps."""
    rates = schedule["rates"]
    if schedule.get("r") is not None:  # ToMe multi-layer: r tokens merged per block, whatever K
        amount = f"r={schedule['r']}"
    elif all(r == cfg.keep_rate for r in rates):
        amount = f"K={cfg.keep_rate}"
    else:
        amount = f"K={rates}"
    where = f"{schedule['name']}-layer at blocks {schedule['blocks']}"
    return f"{cfg.model.name} / {cfg.method.name}: {where}, {amount}"


def log_image(loggers: list[Logger], path: Path, caption: str) -> None:
    """Send the PNG to W&B when it is one of the run's loggers (offline runs keep it locally)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({"token_maps": wandb.Image(str(path), caption=caption)})


def visualize(cfg: DictConfig) -> dict[str, Any]:
    """Draw the token maps of one configuration, record the run, and return its record."""
    check_settings(cfg)
    settings = cfg.visualize
    recorder = RunRecorder(cfg, keep_rate=cfg.keep_rate)
    with recorder, job_loggers(cfg) as loggers:
        spec: BackboneSpec = instantiate(cfg.model)
        datamodule: ClassificationDataModule = instantiate(cfg.data)
        mean, std = image_stats(datamodule)
        datamodule.check((SPLITS[settings.split],))
        check_data_fits_model(datamodule, spec)
        announce_training(cfg, spec)

        model = build_pruned_model(cfg, spec, datamodule.has_labels, loggers, recorder, trace_sources=True)

        L.seed_everything(cfg.seed, verbose=False)  # the training split's augmentation, if drawn
        images, indices = select_images(datamodule, settings.split, settings.num_images, cfg.seed)
        model.eval()
        with torch.no_grad():
            model(images)
        trace = model.last_trace if settings.steps == "all" else model.last_trace[-1:]
        prefix = model.num_prefix_tokens
        steps = [(f"{loc}\n{source.shape[1] - prefix} tokens", source) for loc, source in trace]

        schedule = recorder.fields["schedule"]
        title = describe(cfg, schedule) + weights_label(str(recorder.details.get("weights", "")))
        name = f"{spec.name}_{cfg.method.name}_{schedule['name']}_K{cfg.keep_rate}_seed{cfg.seed}.png"
        path = draw_token_maps(
            to_rgb(images, mean, std),
            steps,
            prefix,
            tuple(model.patch_embed.grid_size),
            title,
            Path(settings.out_dir) / name,
        )
        log_image(loggers, path, title)
        if hasattr(datamodule, "patch_kinds") and settings.split == "val":
            recorder.details["kept_by_kind"] = kept_by_kind(model, datamodule)
        recorder.details.update(
            png=str(path),
            grid=[len(indices), 1 + len(steps)],
            split=settings.split,
            image_indices=indices,
            steps=[str(loc) for loc, _ in trace],
            tokens_per_step=[source.shape[1] - prefix for _, source in trace],
        )
    print(format_summary(recorder.record))
    print(f"  token maps: {path}")
    if "kept_by_kind" in recorder.details:
        kept = recorder.details["kept_by_kind"]
        print(
            "  patches kept by the last step, held out: "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in kept.items())
        )
    return recorder.record


def kept_by_kind(model: torch.nn.Module, datamodule: ClassificationDataModule) -> dict[str, float]:
    """The fraction of each kind of patch (cluttered MNIST: blank, clutter, digit) that the method's
    last step keeps (a patch merged into a kept token counts as kept), over the held-out split.

    Random drop keeps every kind at about K; a method that finds the object keeps more digit
    patches than that, and fewer blank and clutter ones."""
    from ..data.cluttered_mnist import PATCH_KINDS

    kinds = datamodule.patch_kinds("held_out", model.patch_embed.patch_size[0])
    kept = []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            model(batch[0])
            kept.append(torch.from_numpy(patch_owners(model.last_trace[-1][1], model.num_prefix_tokens) >= 0))
    kept = torch.cat(kept)
    return {
        name: round(kept[kinds == index].float().mean().item(), 4)
        for index, name in enumerate(PATCH_KINDS)
        if (kinds == index).any()
    }
