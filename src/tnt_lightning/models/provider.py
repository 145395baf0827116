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
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer

from ..results.identity import data_identity, legacy_data_identity
from .artefact_io import adopt_legacy, checksum_matches, load_weight_file, reuse_cached, save_artefact
from .backbones import BackboneSpec, WeightsUnavailableError, create_model, load_hub_weights
from .checkpoint import load_backbone_state, read_state_dict, state_dict_of
from .ddp import Ranks, this_rank, train_once

log = logging.getLogger(__name__)

# Trains ``model`` in place as ``spec.pretrain`` says, keeping its resumable state (last.ckpt) in the
# given work folder; returns the metrics to store beside the weights.
PretrainFn = Callable[[VisionTransformer, BackboneSpec, Path], dict[str, Any]]


def pretrain_key(spec: BackboneSpec, world_size: int = 1, legacy: bool = False) -> str:
    """Hash of everything that determines pretrained weights: architecture, classes, input, recipe
    (its data as ``results/identity.py`` declares), and the number of DDP processes when there are
    several (one process: the key of before). ``legacy``: the key of weights cached before the data
    counted by content."""
    recipe = OmegaConf.to_container(OmegaConf.create(spec.pretrain), resolve=True)
    if "data" in recipe:
        recipe["data"] = (legacy_data_identity if legacy else data_identity)(recipe["data"], "weights")
    blob = {
        "name": spec.name,
        "arch": dict(spec.arch),
        "num_classes": spec.num_classes,
        "input_size": list(spec.input_size),
        "pretrain": recipe,
    }
    if world_size > 1:
        blob["world_size"] = world_size
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pretrained_path(
    spec: BackboneSpec, cache_dir: str | Path, world_size: int = 1, legacy: bool = False
) -> Path:
    """Where the pretrained weights for ``spec`` are cached (``legacy``: their name before the data
    counted by content)."""
    key = pretrain_key(spec, world_size, legacy)
    return Path(cache_dir).expanduser() / "backbones" / f"{spec.name}-{key}.pth"


def pretrain_workdir(spec: BackboneSpec, cache_dir: str | Path, world_size: int = 1) -> Path:
    """Where a pretraining keeps ``last.ckpt`` until its weights are cached (a killed one resumes)."""
    return pretrained_path(spec, cache_dir, world_size).with_suffix(".work")


def ensure_pretrained(
    spec: BackboneSpec,
    cache_dir: str | Path,
    pretrain: PretrainFn,
    force: bool = False,
    ranks: Ranks | None = None,
) -> Path:
    """The cached weights for ``spec``, training them first if they are missing or damaged (or ``force``).

    A file lock makes concurrent jobs wait for the one that trains; the file is written to a
    temporary name and renamed, then its checksum beside it (:func:`save_artefact`), so nobody reads
    a half-written checkpoint, and a damaged one is found, reported and trained again. The ranks of
    a DDP job (``ranks``, the job's trainer) pretrain together, as their rank 0 decides
    (:func:`tnt_lightning.models.ddp.train_once`).
    """
    world_size = ranks.world_size if ranks is not None else 1
    path = pretrained_path(spec, cache_dir, world_size)
    adopt_legacy(path, pretrained_path(spec, cache_dir, world_size, legacy=True), artefact="")
    workdir = pretrain_workdir(spec, cache_dir, world_size)
    if not force and checksum_matches(path) and (ranks is None or not ranks.shared):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)

    def reuse() -> bool:
        if not force and reuse_cached(path, "cached backbone", expect_keys=("model",)):
            log.info("using cached backbone %s (checked while holding its lock)", path)
            return True
        return False

    def train() -> None:
        log.warning(
            "training backbone %s once, %s epochs, before this run goes on (model.weights=pretrain; the "
            "progress bar shows the time per epoch); it will be cached at %s",
            spec.name,
            (spec.pretrain or {}).get("epochs", "?"),
            path,
        )
        model = create_model(spec)
        metrics = pretrain(model, spec, workdir)
        if this_rank() != 0:
            return
        key = pretrain_key(spec, world_size)
        save_artefact({"model": model.state_dict(), "spec_key": key, "metrics": metrics}, path)
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("cached %s (%s)", path, metrics)

    train_once(
        ranks or Ranks(),
        Path(str(path) + ".lock"),
        path.parent,
        reuse,
        train,
        refuse=lambda: None,
        saved=lambda: checksum_matches(path),
    )
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
    ranks: Ranks | None = None,
) -> tuple[str, dict[str, torch.Tensor]]:
    """Load ``spec``'s weights into ``model``. Returns where they came from, and any tensors of the
    checkpoint that are not the backbone's (an official method checkpoint's ``alpha_heads``, say);
    ``ranks``: those of the DDP job that may pretrain the backbone (:func:`ensure_pretrained`)."""
    if spec.checkpoint:
        return f"checkpoint:{spec.checkpoint}", _load_checkpoint(model, spec)
    if not need_weights:
        return "random (cost-only run: the data has no labels)", {}
    if spec.weights == "hub":
        load_hub_weights(model, spec)
        return f"hub:{spec.timm_name}", {}
    if spec.weights == "pretrain":
        path = ensure_pretrained(spec, cache_dir, pretrain, ranks=ranks)
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
