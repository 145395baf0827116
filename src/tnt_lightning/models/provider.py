"""Getting a backbone with the right weights: a local file, timm's hub, or the train-once cache."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer

from ..data.folder import weights_relevant
from .artefact_io import checksum_matches, load_weight_file, reuse_cached, save_artefact
from .backbones import BackboneSpec, WeightsUnavailableError, create_model, load_hub_weights
from .checkpoint import load_backbone_state, read_state_dict, state_dict_of

log = logging.getLogger(__name__)

# Trains ``model`` in place as ``spec.pretrain`` says, keeping its resumable state (last.ckpt) in the
# given work folder; returns the metrics to store beside the weights.
PretrainFn = Callable[[VisionTransformer, BackboneSpec, Path], dict[str, Any]]


def pretrain_key(spec: BackboneSpec) -> str:
    """Hash of everything that determines pretrained weights: architecture, classes, input, recipe."""
    recipe = OmegaConf.to_container(OmegaConf.create(spec.pretrain), resolve=True)
    if "data" in recipe:  # workers, eval batch size ... of the training data change no weight
        recipe["data"] = weights_relevant(recipe["data"])
    blob = {
        "name": spec.name,
        "arch": dict(spec.arch),
        "num_classes": spec.num_classes,
        "input_size": list(spec.input_size),
        "pretrain": recipe,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pretrained_path(spec: BackboneSpec, cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / "backbones" / f"{spec.name}-{pretrain_key(spec)}.pth"


def pretrain_workdir(spec: BackboneSpec, cache_dir: str | Path) -> Path:
    """Where a pretraining keeps ``last.ckpt`` until its weights are cached (a killed one resumes)."""
    return pretrained_path(spec, cache_dir).with_suffix(".work")


def ensure_pretrained(
    spec: BackboneSpec, cache_dir: str | Path, pretrain: PretrainFn, force: bool = False
) -> Path:
    """The cached weights for ``spec``, training them first if they are missing or damaged (or ``force``).

    A file lock makes concurrent jobs wait for the one that trains; the file is written to a
    temporary name and renamed, then its checksum beside it (:func:`save_artefact`), so nobody reads
    a half-written checkpoint, and a damaged one is found, reported and trained again.
    """
    path = pretrained_path(spec, cache_dir)
    if not force and checksum_matches(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not force and reuse_cached(path, "cached backbone", expect_keys=("model",)):
            log.info("using cached backbone %s (checked while holding its lock)", path)
            return path
        log.warning(
            "training backbone %s once, %s epochs, before this run goes on (model.weights=pretrain; the "
            "progress bar shows the time per epoch); it will be cached at %s",
            spec.name,
            (spec.pretrain or {}).get("epochs", "?"),
            path,
        )
        model = create_model(spec)
        metrics = pretrain(model, spec, pretrain_workdir(spec, cache_dir))
        save_artefact({"model": model.state_dict(), "spec_key": pretrain_key(spec), "metrics": metrics}, path)
        shutil.rmtree(pretrain_workdir(spec, cache_dir), ignore_errors=True)
        log.info("cached %s (%s)", path, metrics)
    return path


def check_checkpoint(model: VisionTransformer, spec: BackboneSpec) -> None:
    """Open ``model.checkpoint`` and check that it fits ``model``, before anything expensive runs.

    ``model`` is a scratch copy: it gets the weights, which the caller may discard.
    """
    if spec.checkpoint:
        _load_checkpoint(model, spec)


def _load_checkpoint(model: VisionTransformer, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    state = read_state_dict(spec.checkpoint, trust_pickle=spec.trust_pickle)
    return load_backbone_state(model, state, f"model.checkpoint={spec.checkpoint}")


def load_weights(
    model: VisionTransformer,
    spec: BackboneSpec,
    cache_dir: str | Path,
    need_weights: bool,
    pretrain: PretrainFn,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Load ``spec``'s weights into ``model``. Returns where they came from, and any tensors of the
    checkpoint that are not the backbone's (an official method checkpoint's ``alpha_heads``, say)."""
    if spec.checkpoint:
        return f"checkpoint:{spec.checkpoint}", _load_checkpoint(model, spec)
    if not need_weights:
        return "random (cost-only run: the data has no labels)", {}
    if spec.weights == "hub":
        load_hub_weights(model, spec)
        return f"hub:{spec.timm_name}", {}
    if spec.weights == "pretrain":
        path = ensure_pretrained(spec, cache_dir, pretrain)
        source = f"cached backbone {path}"
        load_backbone_state(model, state_dict_of(load_weight_file(path, source), source), source)
        return f"pretrain:{path}", {}
    if spec.weights == "checkpoint":
        raise WeightsUnavailableError(
            f"model {spec.name!r} has no public weights: pass a trained checkpoint as model.checkpoint=PATH"
        )
    log.warning(
        "model %s runs with random weights (model.weights=random): accuracy is meaningless", spec.name
    )
    return "random", {}
