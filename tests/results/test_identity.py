"""One table says what decides an outcome (results/identity.py); the experiment key, the backbone
weights and the trained-method identity follow it, and a folder data set counts by its content."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from helpers import compose_config, run_py
from tnt_lightning.engine import backbone_info
from tnt_lightning.methods import TNT, build_reducer
from tnt_lightning.models import create_model
from tnt_lightning.models.artefact_io import checksum_matches, save_artefact
from tnt_lightning.models.ddp import Ranks
from tnt_lightning.models.provider import pretrain_key
from tnt_lightning.models.trained import TRAINED_FILE, training_dir, training_folder
from tnt_lightning.results import content as data_content_module
from tnt_lightning.results import read_records
from tnt_lightning.results.content import split_content
from tnt_lightning.results.identity import OUTCOME_TABLE, PURPOSES
from tnt_lightning.results.keys import CONFIG_KEY_VERSION, config_key
from tnt_lightning.results.store import record_identity
from tnt_lightning.tasks.inputs import resolve_inputs, stamp_data_content, stamp_method_version


def make_folder(root: Path, train: int = 4, val: int = 2) -> Path:
    """``train/`` and ``val/``, three classes of 32x32 JPEGs."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(3):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def scratch_config(tmp_path: Path, root: Path, *overrides: str):
    cfg = compose_config(
        [
            "task=train",
            "method=tnt",
            "model=vit_scratch",
            "model.num_classes=3",
            "data=imagefolder",
            f"data.root={root}",
            "data.image_size=32",
            *overrides,
        ],
        tmp_path,
    )
    resolve_inputs(cfg)
    stamp_method_version(cfg)
    stamp_data_content(cfg)
    return cfg


def identities(tmp_path: Path, root: Path, *overrides: str) -> dict[str, str]:
    """The three identities of a TNT training on a from-scratch backbone (pretrained on ``root``
    unless the overrides say otherwise)."""
    cfg = scratch_config(tmp_path, root, *overrides)
    spec = instantiate(cfg.model)
    info = backbone_info(create_model(spec))
    reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, info)
    return {
        "experiment": config_key(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)),
        "weights": pretrain_key(spec, Ranks(cfg.trainer).world_size),
        "trained": training_dir(cfg, spec, reducer).name,
    }


def _copy_without(src: Path, dst: Path, drop: str) -> Path:
    shutil.copytree(src, dst)
    (dst / drop).unlink()
    return dst


TRAIN_IMAGE, VAL_IMAGE = "train/class_0/0.jpg", "val/class_0/0.jpg"
FOLDER_CLASS = "tnt_lightning.data.folder.ImageFolderDataModule"
# How each fact of the table is varied: overrides, or another folder made from the base one.
VARIATIONS = {
    "data.root": lambda base, tmp: (shutil.copytree(base, tmp / "moved"), ()),
    "data.content.<train split>": lambda base, tmp: (
        _copy_without(base, tmp / "sub", "train/class_0/0.jpg"),
        (),
    ),
    "data.content.<evaluation split>": lambda base, tmp: (
        _copy_without(base, tmp / "sub", "val/class_0/0.jpg"),
        (),
    ),
    "data.cache_dir": lambda base, tmp: (base, ("data.cache_dir=/elsewhere",)),
    "data.decoded_cache": lambda base, tmp: (base, ("data.decoded_cache=true",)),
    "data.num_workers": lambda base, tmp: (base, ("data.num_workers=1",)),
    "data.pin_memory": lambda base, tmp: (base, ("+data.pin_memory=false",)),
    "data.eval_batch_size": lambda base, tmp: (base, ("data.eval_batch_size=7",)),
    "data.batch_size": lambda base, tmp: (base, ("data.batch_size=32",)),
    "data.train_overrides": lambda base, tmp: (base, ("+data.train_overrides.epochs=3",)),
    "data._target_": lambda base, tmp: (
        base,
        (f"data._target_={FOLDER_CLASS}",),
    ),
    "data.preprocess (values)": lambda base, tmp: (base, ("data.preprocess.crop_pct=0.5",)),
    "data.preprocess.source": lambda base, tmp: (
        base,
        ("data.preprocess.source=deit",),
    ),
    "data.on_bad_image": lambda base, tmp: (base, ("data.on_bad_image=skip",)),
    "seed": lambda base, tmp: (base, ("seed=1",)),
    "method.version": None,  # a class attribute: varied below
    "world size (training)": lambda base, tmp: (
        base,
        ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"),
    ),
    "method._target_": lambda base, tmp: (base, ("method._target_=tnt_lightning.methods.tnt.TNT",)),
}


def test_every_fact_of_the_table_is_varied_here():
    assert set(VARIATIONS) == set(OUTCOME_TABLE)


@pytest.mark.parametrize("pretrained_here", [True, False], ids=["pretrained-here", "given-weights"])
@pytest.mark.parametrize("fact", sorted(OUTCOME_TABLE))
def test_each_identity_changes_exactly_when_the_table_says(fact, pretrained_here, tmp_path, monkeypatch):
    """With a backbone pretrained here, what changes its weights also changes the experiment and the
    trained artefact (both hold the weights' identity); with given weights, only the table's own."""
    base = make_folder(tmp_path / "images")
    weights = () if pretrained_here else ("model.weights=random",)
    before = identities(tmp_path, base, *weights)
    if fact == "method.version":
        monkeypatch.setattr(TNT, "version", 2)
        after = identities(tmp_path, base, *weights)
    else:
        root, overrides = VARIATIONS[fact](base, tmp_path)
        after = identities(tmp_path, root, *weights, *overrides)
    declared = OUTCOME_TABLE[fact]
    weights_changed = declared.weights and pretrained_here
    expected = {
        "experiment": declared.experiment or weights_changed,
        "weights": declared.weights,
        "trained": declared.trained or weights_changed,
    }
    assert {p: before[p] != after[p] for p in PURPOSES} == expected, (fact, declared.why)


def test_content_counts_images_and_names_and_is_cached_until_a_folder_changes(tmp_path, monkeypatch):
    split = make_folder(tmp_path / "images") / "val"
    cache = tmp_path / "cache"
    first = split_content(split, cache)
    assert first["images"] == 6
    listed = []
    real = data_content_module._list_split
    monkeypatch.setattr(data_content_module, "_list_split", lambda *a: listed.append(1) or real(*a))
    assert split_content(split, cache) == first and not listed, "the cached fingerprint is reused"
    (split / "class_1" / "0.jpg").rename(split / "class_1" / "renamed.jpg")
    renamed = split_content(split, cache)
    assert listed and renamed["images"] == 6 and renamed["files"] != first["files"]


def test_records_of_the_previous_key_rule_are_rekeyed_to_the_content_key(tmp_path):
    """A record made before content counted (no data.content, key version 5) matches a run on the
    same folder; one whose folder is gone keeps a key of its own."""
    base = make_folder(tmp_path / "images")
    cfg = scratch_config(tmp_path, base, "task=eval", "method=random")
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    now = config_key(config)
    old_config = json.loads(json.dumps(config))
    del old_config["data"]["content"]
    old = {
        "task": "eval",
        "config": old_config,
        "config_key": "0123",
        "config_key_version": CONFIG_KEY_VERSION - 1,
    }
    assert record_identity(old) == ("eval", now)
    old_config["data"]["root"] = str(tmp_path / "gone")
    assert record_identity(old)[1] != now


def test_an_artefact_trained_under_the_root_identity_is_adopted_not_retrained(tmp_path):
    base = make_folder(tmp_path / "images")
    cfg = scratch_config(tmp_path, base)
    spec = instantiate(cfg.model)
    info = backbone_info(create_model(spec))
    reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, info)
    legacy = training_folder(cfg, spec, reducer, legacy=True)
    legacy.mkdir(parents=True)
    save_artefact(
        {"method": "tnt", "model": spec.name, "identity": {}, "state_dict": {}}, legacy / TRAINED_FILE
    )
    current = training_dir(cfg, spec, reducer)
    assert current != legacy and not legacy.exists()
    assert checksum_matches(current / TRAINED_FILE)


@pytest.mark.parametrize("method", ["tnt", "dynamicvit"])
def test_artefacts_of_data_without_a_folder_keep_their_names(method, tmp_path):
    """The table changed only folder data sets' identities: MNIST's trained artefacts and backbone
    keep the names they were cached under."""
    cfg = compose_config([f"method={method}"], tmp_path)
    spec = instantiate(cfg.model)
    info = backbone_info(create_model(spec))
    reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, info)
    assert training_folder(cfg, spec, reducer) == training_folder(cfg, spec, reducer, legacy=True)
    assert pretrain_key(spec) == pretrain_key(spec, legacy=True)


def test_a_moved_folder_is_the_same_experiment_and_a_subset_is_not(tmp_path):
    """Through run.py: evaluated once, then from its moved copy (already recorded), then a subset."""
    base = make_folder(tmp_path / "images")
    work = tmp_path / "work"
    work.mkdir()
    args = [
        "task=eval",
        "method=random",
        "keep_rate=0.5",
        "model=vit_scratch",
        "model.num_classes=3",
        "model.weights=random",
        "data=imagefolder",
        "data.image_size=32",
        "data.num_workers=0",
        "measure=quick",
    ]
    moved = shutil.copytree(base, tmp_path / "moved")
    subset = _copy_without(base, tmp_path / "subset", "val/class_2/1.jpg")
    for root in (base, moved, subset):
        proc = run_py([*args, f"data.root={root}"], work)
        assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(work / "results")
    assert [r["details"]["images_evaluated"] for r in records] == [6, 5]
    assert [r["config"]["data"]["root"] for r in records] == [str(base), str(subset)]


def test_the_table_is_printed_for_people(capsys):
    from tnt_lightning.results.__main__ import main

    assert main(["identity"]) == 0
    printed = capsys.readouterr().out
    assert all(f"| `{fact}` |" in printed for fact in OUTCOME_TABLE)
