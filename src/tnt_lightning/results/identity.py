"""What decides an outcome: the one table behind the project's three identities.

* the **experiment key** (:func:`.keys.config_key`): which runs are the same experiment, so that
  none runs or is recorded twice;
* the **backbone-weights identity** (``models/provider.py``, ``pretrain_key``): which cached
  pretrained backbone a ``model.weights=pretrain`` run uses;
* the **trained-method identity** (``training_identity``): which cached trained artefact of a
  learned method a run uses.

:data:`OUTCOME_TABLE` says, fact by fact, which of the three it decides and why; the three read
the data config through :func:`data_identity`, which applies the data rows of that table, and
``tests/results/test_identity.py`` varies each fact and checks that exactly the identities the table names
change. A folder dataset counts by its content (:mod:`tnt_lightning.results.content`: image count and
file-list fingerprint per split), never by its location: a moved ImageNet is the same data, a
subset of it is not.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Literal

Purpose = Literal["experiment", "weights", "trained"]
PURPOSES: tuple[Purpose, ...] = ("experiment", "weights", "trained")


@dataclass(frozen=True)
class Decides:
    """Which identities a fact decides, and why."""

    experiment: bool
    weights: bool
    trained: bool
    why: str

    def of(self, purpose: Purpose) -> bool:
        return getattr(self, purpose)


# Every fact that one of the identities treats specially. A data key not listed decides all three
# (a new data option changes outcomes until declared otherwise here).
OUTCOME_TABLE: dict[str, Decides] = {
    "data.root": Decides(False, False, False, "where the files lie; data.content says what they are"),
    "data.content.<train split>": Decides(True, True, True, "the images a backbone or a method trains on"),
    "data.content.<evaluation split>": Decides(
        True, False, False, "the images evaluated; training reads only the training split"
    ),
    "data.cache_dir": Decides(False, False, False, "where decoded data is cached"),
    "data.decoded_cache": Decides(
        False,
        False,
        False,
        "whether evaluation crops are decoded each time or read from their decoded cache: the batches "
        "are bitwise the same (tests/data/test_decoded_cache.py), and training splits are never cached",
    ),
    "data.num_workers": Decides(False, False, False, "how many processes load the data"),
    "data.pin_memory": Decides(False, False, False, "how batches reach the device"),
    "data.eval_batch_size": Decides(False, False, False, "an image's result does not depend on its batch"),
    "data.batch_size": Decides(
        False,
        True,
        False,
        "the batch of a backbone's pretraining; a learned method's recipe sets its own batch size and "
        "evaluation uses eval_batch_size",
    ),
    "data.train_overrides": Decides(
        True,
        False,
        True,
        "recipe changes per data set, counted through the recipe they change: the trained identity "
        "holds the merged recipe, the experiment key the run's own method's overrides",
    ),
    "data._target_": Decides(
        False,
        True,
        False,
        "the Python path of the data class: data.name names the data set, and a moved class must not "
        "change an experiment; a pretraining recipe's data may be named by its class alone",
    ),
    "data.preprocess (values)": Decides(True, True, True, "resize, crop and normalisation of every image"),
    "data.preprocess.source": Decides(False, False, False, "how the values were found, not what they are"),
    "data.on_bad_image": Decides(True, True, True, "skip leaves undecodable images out"),
    "seed": Decides(True, False, True, "random draws of methods and training; pretraining has its own"),
    "method.version": Decides(True, False, True, "a change of a method's code that changes its results"),
    "world size (training)": Decides(
        True, True, True, "the number of training processes scales the effective batch (training tasks only)"
    ),
    "method._target_": Decides(False, False, False, "the Python path of the method: method.name names it"),
}

# The data keys of OUTCOME_TABLE that decide nothing anywhere, or only some identities.
DATA_KEYS: dict[str, Decides] = {
    k.removeprefix("data."): v for k, v in OUTCOME_TABLE.items() if k.startswith("data.") and " " not in k
}


def outcome_table() -> str:
    """:data:`OUTCOME_TABLE` as Markdown (``python -m tnt_lightning.results identity``)."""
    mark = {True: "yes", False: "-"}
    lines = [
        "| fact | experiment key | backbone weights | trained method | why |",
        "|---|---|---|---|---|",
    ]
    for fact, d in OUTCOME_TABLE.items():
        lines.append(f"| `{fact}` | {mark[d.experiment]} | {mark[d.weights]} | {mark[d.trained]} | {d.why} |")
    lines += [
        "\nAny other data key decides all three; outside data, results/keys.py says what the experiment key",
        "leaves out (paths, loggers, launchers, ...). A backbone pretrained by the framework passes what",
        "decides its weights on to the experiments and trained methods that use it.",
    ]
    return "\n".join(lines)


PREPROCESS_KEYS = ("mean", "std", "crop_pct", "crop_mode", "interpolation")
# DeiT's evaluation recipe (its official code: bicubic resize to 256, centre crop 224, ImageNet
# statistics): what every image-folder record was preprocessed with before data.preprocess existed.
DEIT_PREPROCESSING: dict[str, Any] = {
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "crop_pct": 0.875,
    "crop_mode": "center",
    "interpolation": "bicubic",
}


def comparable_preprocessing(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its preprocessing in the form identities compare.

    Records made before ``data.preprocess`` existed hold ``crop_pct`` (and ``mean``/``std`` when a
    user had added them) at the top of ``data``, and were preprocessed with DeiT's recipe otherwise.
    A resolved ``data.preprocess`` is brought to that layout: ``crop_pct`` always, ``mean``, ``std``,
    ``crop_mode`` and ``interpolation`` only where they differ from DeiT's. So a run whose
    preprocessing is what an older record's was has that record's identity, and one whose
    preprocessing differs (an AugReg backbone's, say) never matches it. ``source`` and ``origin``
    say how the values were found, not what they are, and are left out.
    """
    data = dict(data)
    preprocess = data.pop("preprocess", None)
    if not isinstance(preprocess, dict):
        return data
    for key in PREPROCESS_KEYS:
        value = preprocess.get(key)
        if isinstance(value, list | tuple):
            value = [float(v) for v in value]
        if key == "crop_pct" or value != DEIT_PREPROCESSING[key]:
            data[key] = value
    return data


def data_identity(data: dict[str, Any] | None, purpose: Purpose) -> dict[str, Any] | None:
    """The part of a resolved data config that decides ``purpose``'s identity (the table above).

    Args:
        data: a resolved ``data`` config (a run's, or a pretraining recipe's).
        purpose: ``experiment``, ``weights`` or ``trained``.

    Returns:
        The deciding keys; ``content`` reduced to the training split for ``weights`` and ``trained``.
    """
    if not data:
        return data
    data = comparable_preprocessing(data)
    kept = {k: v for k, v in data.items() if k not in DATA_KEYS or DATA_KEYS[k].of(purpose)}
    if purpose == "trained":
        kept.pop("train_overrides", None)  # counted through the merged recipe it changes (the table)
    content = kept.get("content")
    if isinstance(content, dict) and purpose != "experiment":
        train = content.get(data.get("train_split", "train"))
        if train is None:
            kept.pop("content")
        else:
            kept["content"] = {data.get("train_split", "train"): train}
    return kept


def legacy_data_identity(data: dict[str, Any] | None, purpose: Purpose) -> dict[str, Any] | None:
    """The data identity of cached artefacts named before :data:`OUTCOME_TABLE` (by ``data.root``,
    not content), used only to adopt such an artefact under its current name instead of training
    it again (``models/artefact_io.adopt_legacy``)."""
    if not data or purpose == "experiment":
        return data
    left_out = {
        "weights": (
            "num_workers",
            "pin_memory",
            "cache_dir",
            "eval_batch_size",
            "on_bad_image",
            "train_overrides",
            "decoded_cache",
        ),
        "trained": (
            "_target_",
            "batch_size",
            "eval_batch_size",
            "num_workers",
            "pin_memory",
            "train_overrides",
            "cache_dir",
            "decoded_cache",
        ),
    }[purpose]
    data = comparable_preprocessing({k: v for k, v in data.items() if k != "content"})
    return {k: v for k, v in data.items() if k not in left_out}


def with_content(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``data.content`` filled in from ``data.root`` where it is missing: the
    records of a folder data set made before content counted, re-keyed once, match the runs made
    since on the same folder (a folder gone since: they keep a key of their own)."""
    data = config.get("data")
    if not isinstance(data, dict) or data.get("content") is not None or not data.get("root"):
        return config
    cache_dir = (config.get("paths") or {}).get("cache_dir")
    content = _legacy_content(json.dumps(data, sort_keys=True, default=str), cache_dir)
    return config if content is None else {**config, "data": {**data, "content": content}}


@functools.lru_cache(maxsize=64)
def _legacy_content(data_json: str, cache_dir: str | None) -> dict[str, Any] | None:
    """:func:`~tnt_lightning.results.content.data_content`, once per data config while a store re-keys
    its older records."""
    from .content import data_content  # lists a folder: only for records that need it

    return data_content(json.loads(data_json), cache_dir)
