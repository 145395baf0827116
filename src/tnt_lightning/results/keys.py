"""``config_key``: which runs are the same experiment, whatever folder, machine or launcher ran them.

The key is a hash of the part of the resolved config that can change a run's outcome. The rule,
versioned by :data:`CONFIG_KEY_VERSION` (docs/results-store.md):

* left out, because they only say where or how a result is computed: ``paths``, ``logger``,
  ``hydra`` (launchers included), ``sweep_name``, ``tags``, ``skip_recorded``, ``verbose``,
  ``extra`` (the user's own annotations), the data keys that :data:`.identity.OUTCOME_TABLE`
  declares outside the experiment (the data set's location, loader settings, class path), the
  method's class path, and every ``trainer`` key except :data:`TRAINER_OUTCOME` (so 1 or N GPUs,
  CPU or GPU, DDP or not, give the same key for the same evaluation). Training tasks
  (``train``, ``train_eval``, ``pretrain``) also keep the number of training processes, which
  scales the effective batch and so the learning rate;
* dropped while at their default, because they were added after records already existed and do
  not change those records' outcome at that default (:data:`NEUTRAL_DEFAULTS`): an older record,
  whose config lacks them, keeps its key;
* left out where they cannot matter (since v3): the keep rate and schedule of an unpruned run
  (``method=none``), and the method, keep rate and schedule of ``task=pretrain`` (which trains
  the backbone alone), so a sweep over methods and keep rates evaluates the unpruned model once;
  since v5 also the keep rate and schedule rates of multi-layer ToMe driven by ``method.r``, so a
  sweep over keep rates runs it once per ``r``;
* a data set's training-recipe overrides (``data.train_overrides``) count only for the method they
  adapt (since v4): their common keys and the run's method's own mapping, for a method that
  trains (never for ``task=pretrain``); so changing dTPS's override leaves every other method's
  records current;
* a data set's preprocessing counts by its values, never by how they were found: a resolved
  ``data.preprocess`` is written in the layout of the records made before it existed
  (:func:`.identity.comparable_preprocessing`), so a DeiT run keeps its key while a backbone whose own
  preprocessing differs from DeiT's (an AugReg ViT, say) gets a new one;
* a folder data set counts by its content (since v6): ``data.content``, each split's image count
  and file-list fingerprint, stands for ``data.root``, so a moved folder keeps its experiments and
  a subset gets its own; records made before carry no content and are re-keyed from their folder
  where it still exists (:func:`.identity.with_content`);
* everything else is in: model, method, schedule, keep rate, seed, data set name and split,
  measure protocol, task.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .identity import data_identity

CONFIG_KEY_VERSION = 6

TOP_LEVEL_HOW = ("paths", "logger", "hydra", "sweep_name", "tags", "skip_recorded", "verbose", "extra")
TRAINER_OUTCOME = ("precision", "accumulate_grad_batches", "gradient_clip_val", "deterministic")
TRAINING_TASKS = ("train", "train_eval", "pretrain")
# Keys added after config_key v2's first records: dotted key -> the values at which it is left out
# (the behaviour before it existed), as a tuple, or per data set name ("*": any other).
NEUTRAL_DEFAULTS: dict[str, tuple | dict[str, Any]] = {
    "data.on_bad_image": ("fail",),
    "data.train_split": ("train",),
    "data.val_split": ("val", None),
    "data.test_split": (None,),
    "data.augment": ("deit",),
    "data.channels": {"mnist": 1, "*": 3},
    "data.image_size": {"mnist": 28},
    "model.trust_pickle": (False,),
    "method.trust_pickle": (False,),
    "method.official_rounding": (False,),
    "visualize.allow_random_weights": (False,),
    "measure.gflops_images": (100,),
    "method.train.backbone_lr_scale": (0.0,),
    "measure.dtype": ("fp32",),
    "measure.compile": (False,),
    "measure.speedup_pairs": (3,),
    "measure.speedup_bound": (0.1,),
}


def _neutral_values(config: dict[str, Any], neutral: tuple | dict[str, Any]) -> tuple:
    if isinstance(neutral, tuple):
        return neutral
    data_name = (config.get("data") or {}).get("name")
    return (neutral[data_name],) if data_name in neutral else ((neutral["*"],) if "*" in neutral else ())


def _drop_neutral(config: dict[str, Any], dotted: str, neutral: tuple | dict[str, Any]) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    if leaf in node and node[leaf] in _neutral_values(config, neutral):
        del node[leaf]


def _world_size(trainer: dict[str, Any]) -> int | str:
    devices = trainer.get("devices", 1)
    count = len(devices) if isinstance(devices, list) else devices
    nodes = trainer.get("num_nodes", 1) or 1
    return count * nodes if isinstance(count, int) else f"{count}x{nodes}"


def _keep_own_train_overrides(kept: dict[str, Any]) -> None:
    """``data.train_overrides`` reduced to what the run's method reads (the v4 rule above)."""
    data = kept["data"]
    overrides = data.pop("train_overrides", None)
    method = kept.get("method") if isinstance(kept.get("method"), dict) else {}
    if not isinstance(overrides, dict) or "train" not in method or kept.get("task") == "pretrain":
        return
    own = {k: v for k, v in overrides.items() if not isinstance(v, dict)}
    if isinstance(overrides.get(method.get("name")), dict):
        own[method["name"]] = overrides[method["name"]]
    if own:
        data["train_overrides"] = own


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines a run's result (the rule above)."""
    kept = {k: copy.deepcopy(v) for k, v in config.items() if k not in TOP_LEVEL_HOW}
    # Token-map settings only matter to task=visualize, and their folder never does.
    if kept.get("task") == "visualize" and isinstance(kept.get("visualize"), dict):
        kept["visualize"] = {k: v for k, v in kept["visualize"].items() if k != "out_dir"}
    else:
        kept.pop("visualize", None)
    if isinstance(kept.get("model"), dict):  # pins of its preprocessing: counted in data's values
        kept["model"] = {k: v for k, v in kept["model"].items() if k != "preprocess"}
        pretrain = kept["model"].get("pretrain")
        if kept["model"].get("weights") != "pretrain":  # a recipe that never runs decides nothing
            kept["model"].pop("pretrain", None)
        elif isinstance(pretrain, dict) and isinstance(pretrain.get("data"), dict):  # as its weights count it
            kept["model"]["pretrain"] = {**pretrain, "data": data_identity(pretrain["data"], "weights")}
    if isinstance(kept.get("method"), dict):  # a moved class is the same method (identity.py)
        kept["method"] = {k: v for k, v in kept["method"].items() if k != "_target_"}
    if isinstance(kept.get("data"), dict):
        kept["data"] = data_identity(kept["data"], "experiment")
        _keep_own_train_overrides(kept)
    if isinstance(kept.get("trainer"), dict):
        trainer = kept["trainer"]
        kept["trainer"] = {k: trainer[k] for k in TRAINER_OUTCOME if k in trainer}
        if kept.get("task") in TRAINING_TASKS:
            kept["trainer"]["world_size"] = _world_size(trainer)
    for dotted, neutral in NEUTRAL_DEFAULTS.items():
        _drop_neutral(kept, dotted, neutral)
    if kept.get("task") == "pretrain":
        for unused in ("method", "keep_rate", "schedule"):
            kept.pop(unused, None)
    elif isinstance(kept.get("method"), dict) and kept["method"].get("name") == "none":
        kept.pop("keep_rate", None)
        kept.pop("schedule", None)
    elif _driven_by_r(kept):
        kept.pop("keep_rate", None)
        kept["schedule"].pop("rates", None)
    return kept


def _driven_by_r(kept: dict[str, Any]) -> bool:
    """Multi-layer ToMe with ``method.r``: it merges r tokens per block and reads no keep rate."""
    method, schedule = kept.get("method"), kept.get("schedule")
    return (
        isinstance(method, dict)
        and method.get("r") is not None
        and isinstance(schedule, dict)
        and schedule.get("name") == "multi"
    )


def config_key(config: dict[str, Any]) -> str:
    """A stable hash of :func:`comparable_config` (16 hex digits)."""
    blob = json.dumps([CONFIG_KEY_VERSION, comparable_config(config)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
