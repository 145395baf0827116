"""What a run's config leaves open, settled before anything runs: the backbone's input size and
preprocessing, the method's code version and the data's content.

The resolved values are written into the config itself, so that the run's record and its
experiment key hold what was used, not only where it was asked to come from.
"""

from __future__ import annotations

import logging

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from ..data.preprocess import Preprocessing, resolve_preprocessing
from ..models.backbones import timm_input_size
from ..results.content import data_content

log = logging.getLogger(__name__)


def stamp_method_version(cfg: DictConfig) -> None:
    """Write the method's code version (:attr:`TokenReducer.version`) into ``method.version`` when it
    is past 1, so that the experiment key of a changed method differs from its older records'."""
    target = cfg.method.get("_target_")
    if target is None:
        return
    version = getattr(get_class(target), "version", 1)
    if version != 1:
        with open_dict(cfg.method):
            cfg.method.version = version


def stamp_data_content(cfg: DictConfig) -> None:
    """Write a folder data set's content (``data.content``: per split, image count and file-list
    fingerprint, :mod:`tnt_lightning.results.content`) into the config, so that the experiment key and
    the trained identities count the images, not the folder they lie in."""
    if cfg.data.get("root") is None or cfg.data.get("content") is not None:
        return
    data = OmegaConf.to_container(cfg.data, resolve=True)
    content = data_content(data, OmegaConf.select(cfg, "paths.cache_dir"))
    if content is not None:
        with open_dict(cfg.data):
            cfg.data.content = content


def resolve_inputs(cfg: DictConfig) -> Preprocessing | None:
    """Fill in ``model.input_size`` (null: timm's for ``model.timm_name``) and ``data.preprocess``
    (:func:`~tnt_lightning.data.preprocess.resolve_preprocessing`), in place, once.

    Args:
        cfg: the composed run config.

    Returns:
        The resolved preprocessing, or None for data that has none (MNIST, synthetic tensors).
    """
    timm_name = cfg.model.get("timm_name")
    if cfg.model.get("input_size") is None and timm_name:
        cfg.model.input_size = list(timm_input_size(timm_name))
    preprocess = cfg.data.get("preprocess")
    if preprocess is None:
        return None
    asked = OmegaConf.to_container(preprocess, resolve=True)
    if asked.get("origin"):  # resolved already: a config a caller resolved before run_task
        return Preprocessing(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in asked.items() if k != "source"}
        )
    pinned = cfg.model.get("preprocess")
    resolved = resolve_preprocessing(
        asked,
        timm_name=timm_name,
        pinned=OmegaConf.to_container(pinned, resolve=True) if pinned is not None else None,
        model_name=cfg.model.name,
    )
    with open_dict(cfg.data.preprocess):
        for key, value in resolved.values().items():
            cfg.data.preprocess[key] = value
        cfg.data.preprocess.origin = resolved.origin
    log.info("preprocessing: %s", resolved.describe())
    return resolved
