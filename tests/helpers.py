"""Shared test helpers: config composition, tiny backbones, subprocess runs of run.py.

Imported as ``from helpers import ...`` (pyproject puts ``tests/`` on pytest's import path);
``conftest.py`` holds only the fixtures and hooks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from tnt_lightning.config import compose_config as compose
from tnt_lightning.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# Tests marked ``gpu`` need a CUDA device and are skipped without one (pytest_collection_modifyitems);
# a test that holds only on a machine without one is conditional on this.
HAS_CUDA = torch.cuda.is_available()
# The overrides of a cost-only evaluation through run.py: synthetic data, no throughput timing.
COST_ONLY = ["data=synthetic", "measure.throughput=false", "logger=csv"]

register_configs()


def compose_config(overrides: list[str], root: Path) -> DictConfig:
    """The composed config, as run.py would see it, with all paths under ``root``."""
    return compose([f"paths.root_dir={root}", f"paths.output_dir={root}/out", "logger=csv", *overrides], CONF)


# The fast suite's stand-in for the README's `python run.py`: the same run with 3 of vit_mnist's 20
# pretraining epochs (47 s instead of about 200 on 2 cores), so its backbone is trained but weak. The
# README's own command, and the accuracy it reaches, is test_run.py's slow test (make test-default-run).
SHORT_PRETRAIN = ["model.pretrain.epochs=3", "model.pretrain.optim.warmup_epochs=1"]


def run_py(
    args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``python run.py args`` in a subprocess rooted at ``cwd`` (results, cache, logs go there)."""
    full_env = {
        **os.environ,
        "TNT_ROOT": str(cwd),
        "WANDB_MODE": "disabled",
        "HYDRA_FULL_ERROR": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_vit(
    prefix: int = 1,
    depth: int = 4,
    dim: int = 48,
    heads: int = 4,
    img: int = 32,
    patch: int = 8,
    mlp_ratio: float = 2.0,
    num_classes: int = 10,
    seed: int = 0,
) -> VisionTransformer:
    """A random-weight timm ViT: prefix 0 (mean-pooled), 1 (CLS) or 2 (CLS + DIST)."""
    torch.manual_seed(seed)
    kwargs = dict(
        img_size=img,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        num_classes=num_classes,
        qkv_bias=True,
    )
    if prefix == 2:
        model = VisionTransformerDistilled(**kwargs)
    elif prefix == 1:
        model = VisionTransformer(**kwargs)
    else:
        model = VisionTransformer(class_token=False, global_pool="avg", fc_norm=False, **kwargs)
    # timm initialises the prefix tokens and position embeddings to ~0; make them distinct.
    with torch.no_grad():
        for name in ("cls_token", "dist_token"):
            if getattr(model, name, None) is not None:
                getattr(model, name).normal_()
        model.pos_embed.normal_(std=0.5)
    return model.eval()


def all_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))
