"""Preprocessing follows the backbone: the framework's evaluation tensors equal timm's own pipeline's
for each kind of pretrained ViT, using only the metadata timm ships (no weights), and the resolved
values reach the record and the experiment key without changing the keys of older records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms

from helpers import compose_config
from tnt_lightning.data import resolve_preprocessing
from tnt_lightning.data.base import loader_workers
from tnt_lightning.errors import ConfigError
from tnt_lightning.results import config_key
from tnt_lightning.results.identity import DEIT_PREPROCESSING, data_identity
from tnt_lightning.tasks.inputs import resolve_inputs

# DeiT, DeiT III, AugReg ViT (timm's default weights for vit_* names), a CLIP ViT, a SigLIP ViT, a
# register-token ViT, 384-pixel models (one with squash crops), a bilinear one.
TIMM_NAMES = (
    "deit_small_patch16_224.fb_in1k",
    "deit3_small_patch16_224.fb_in22k_ft_in1k",
    "vit_tiny_patch16_224",
    "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_clip_224.openai_ft_in1k",
    "vit_base_patch16_siglip_224.v2_webli",
    "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_base_patch16_384.augreg_in21k_ft_in1k",
    "vit_base_patch16_clip_384.laion2b_ft_in1k",
    "vit_base_patch16_224_miil.in21k",
)

AUGREG_TINY = ("model=timm", "model.timm_name=vit_tiny_patch16_224")


def made_images() -> list[Image.Image]:
    """Photos stand-ins of several shapes: wide, tall, smaller than the crop, and a greyscale one."""
    rng = np.random.default_rng(0)
    shapes = [(300, 260), (180, 400), (100, 150), (520, 600)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    return [*images, images[0].convert("L").convert("RGB")]


def timm_eval_transform(timm_name: str) -> transforms.Compose:
    """timm's own pipeline for the pretrained model: ``create_transform(**resolve_data_config(model))``."""
    with torch.device("meta"):  # the model's metadata, without allocating its weights
        model = timm.create_model(timm_name, pretrained=False)
    return create_transform(**resolve_data_config({}, model=model))


def make_folder(root, classes=("a", "b", "c"), per_class=4, size=(300, 260)):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg", quality=90)
    return root


def folder_datamodule(tmp_path, *overrides: str):
    cfg = compose_config(
        ["data=imagefolder", f"data.root={tmp_path}", "data.num_workers=0", *overrides], tmp_path
    )
    resolved = resolve_inputs(cfg)
    return cfg, resolved, instantiate(cfg.data)


@pytest.mark.parametrize("timm_name", TIMM_NAMES)
def test_eval_tensors_equal_timms_own_pipeline(timm_name, tmp_path):
    cfg, resolved, datamodule = folder_datamodule(
        tmp_path, "model=timm", f"model.timm_name={timm_name}", "data.image_size=${model.input_size.1}"
    )
    assert datamodule.image_size == cfg.model.input_size[1]
    ours, theirs = datamodule.transform(train=False), timm_eval_transform(timm_name)
    for image in made_images():
        assert torch.equal(ours(image), theirs(image)), (timm_name, image.size, resolved)


def test_augreg_statistics_are_not_deits(tmp_path):
    """The check above would catch a wrong normalisation: DeiT's preprocessing of the same image
    differs from the AugReg backbone's."""
    _, resolved, datamodule = folder_datamodule(
        tmp_path, "model=timm", "model.timm_name=vit_tiny_patch16_224"
    )
    assert resolved.mean == resolved.std == (0.5, 0.5, 0.5) and resolved.crop_pct == 0.9
    deit = resolve_preprocessing({"source": "deit"}).eval_transform(224)
    image = made_images()[0]
    assert not torch.allclose(datamodule.transform(train=False)(image), deit(image))


@pytest.mark.parametrize("model", ["deit_tiny", "deit_small_distilled", "deit_base_distilled"])
def test_paper_deit_configs_keep_deits_official_evaluation(model, tmp_path):
    """DeiT's official evaluation: bicubic resize to 256, centre crop 224, ImageNet statistics
    (timm's pretrained config says crop 0.9; the model configs pin 0.875)."""
    _, resolved, datamodule = folder_datamodule(tmp_path, f"model={model}")
    assert resolved.values() == DEIT_PREPROCESSING
    assert "pinned by model=" in resolved.origin
    official = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    for image in made_images():
        assert torch.equal(datamodule.transform(train=False)(image), official(image))


def test_training_augmentation_uses_the_backbones_statistics(tmp_path):
    _, _, datamodule = folder_datamodule(tmp_path, "model=timm", "model.timm_name=vit_tiny_patch16_224")
    normalise = [
        t for t in datamodule.transform(train=True).transforms if isinstance(t, transforms.Normalize)
    ]
    assert [tuple(t.mean.tolist()) for t in normalise] == [(0.5, 0.5, 0.5)]


def test_overrides_and_their_origin(tmp_path):
    _, resolved, _ = folder_datamodule(
        tmp_path, "model=timm", "model.timm_name=vit_tiny_patch16_224", "data.preprocess.crop_pct=1.0"
    )
    assert resolved.crop_pct == 1.0 and resolved.mean == (0.5, 0.5, 0.5)
    assert "crop_pct" in resolved.origin and "vit_tiny_patch16_224.augreg_in21k_ft_in1k" in resolved.origin
    _, deit, _ = folder_datamodule(
        tmp_path, "model=timm", "model.timm_name=vit_tiny_patch16_224", "data.preprocess.source=deit"
    )
    assert deit.values() == DEIT_PREPROCESSING
    _, scratch, _ = folder_datamodule(tmp_path, "model=vit_scratch", "data.preprocess.crop_pct=1.0")
    assert scratch.values() == {**DEIT_PREPROCESSING, "crop_pct": 1.0}
    assert "no timm pretrained config" in scratch.origin


@pytest.mark.parametrize(
    ("preprocess", "message"),
    [
        ({"source": "imagenet"}, "data.preprocess.source='imagenet' is not one of"),
        ({"source": "given", "mean": [0.5] * 3}, r"missing: \['std', 'crop_pct'"),
        ({"source": "deit", "crop_pct": 1.5}, r"data.preprocess.crop_pct=1.5"),
        ({"source": "deit", "crop_mode": "middle"}, r"crop_mode='middle' is not one of"),
        ({"source": "deit", "mean": [0.5, 0.5]}, r"data.preprocess.mean=\[0.5, 0.5\]"),
        ({"source": "deit", "scale": 1}, r"unknown keys \['scale'\]"),
    ],
)
def test_bad_preprocessing_is_refused_naming_it(preprocess, message):
    with pytest.raises(ConfigError, match=message):
        resolve_preprocessing(preprocess)


def test_unknown_tag_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"model.timm_name='vit_tiny_patch16_224.nope'"):
        resolve_preprocessing({"source": "model"}, timm_name="vit_tiny_patch16_224.nope")


def test_timm_model_takes_its_own_input_size(tmp_path):
    cfg = compose_config(["model=timm", "model.timm_name=vit_base_patch16_384", "data=synthetic"], tmp_path)
    resolve_inputs(cfg)
    assert list(cfg.model.input_size) == [3, 384, 384] and list(cfg.data.input_size) == [3, 384, 384]


OLD_RECORDS = Path(__file__).resolve().parents[1] / "fixtures" / "records_before_preprocess.json"


def resolved_config(tmp_path, *overrides: str) -> dict:
    cfg = compose_config(["data=imagenet", "data.root=/data/imagenet", *overrides], tmp_path)
    resolve_inputs(cfg)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def test_deit_records_keep_matching_and_timm_records_match_deit_preprocessing_only(tmp_path):
    """Configs of real records written by the code before ``data.preprocess`` (3db31eb, ``data=imagenet``):
    the DeiT one matches the same command now; the ``model=timm`` one, made with DeiT's preprocessing
    whatever the backbone, matches ``data.preprocess.source=deit`` and never the backbone's own."""
    old = json.loads(OLD_RECORDS.read_text())
    deit = resolved_config(tmp_path, "model=deit_small_distilled")
    assert config_key(deit) == config_key(old["deit"]["config"])
    assert data_identity(deit["data"], "weights") == data_identity(old["deit"]["config"]["data"], "weights")

    timm_record = old["timm"]["config"]
    augreg = resolved_config(tmp_path, *AUGREG_TINY)
    assert config_key(augreg) != config_key(timm_record)
    as_deit = resolved_config(tmp_path, *AUGREG_TINY, "data.preprocess.source=deit")
    assert config_key(as_deit) == config_key(timm_record)
    # the undocumented workaround of before (+data.mean, +data.std, data.crop_pct=0.9) ran AugReg's values
    workaround = json.loads(json.dumps(timm_record))
    workaround["data"].update(mean=[0.5] * 3, std=[0.5] * 3, crop_pct=0.9)
    assert config_key(augreg) == config_key(workaround)
    # how the values were found is not part of the key
    values = [
        "mean=[0.5,0.5,0.5]",
        "std=[0.5,0.5,0.5]",
        "crop_pct=0.9",
        "crop_mode=center",
        "interpolation=bicubic",
    ]
    given = resolved_config(
        tmp_path, *AUGREG_TINY, "data.preprocess.source=given", *[f"data.preprocess.{v}" for v in values]
    )
    assert config_key(given) == config_key(augreg)


def test_auto_workers_follow_the_cpus_this_process_may_use(monkeypatch, caplog):
    monkeypatch.setattr("tnt_lightning.data.base.usable_cpus", lambda: 2)
    with caplog.at_level(logging.INFO, logger="tnt_lightning.data.base"):
        assert loader_workers("auto") == 2
    assert "2 loader workers" in caplog.text
    monkeypatch.setattr("tnt_lightning.data.base.usable_cpus", lambda: 64)
    assert loader_workers("auto") == 8
    assert loader_workers(5) == 5
    with pytest.raises(ValueError, match="data.num_workers='many'"):
        loader_workers("many")


def test_a_folder_run_records_its_preprocessing_and_the_images_it_counted(tmp_path):
    from tnt_lightning.tasks import run_task

    make_folder(tmp_path / "data")
    cfg = compose_config(
        [
            *AUGREG_TINY,
            "model.weights=random",
            "model.num_classes=3",
            "data=imagefolder",
            f"data.root={tmp_path / 'data'}",
            "data.num_workers=0",
            "measure.throughput=false",
        ],
        tmp_path,
    )
    record = run_task(cfg)
    details, metrics = record["details"], record["metrics"]
    assert details["preprocessing"]["mean"] == [0.5, 0.5, 0.5] and details["preprocessing"]["crop_pct"] == 0.9
    assert "vit_tiny_patch16_224.augreg_in21k_ft_in1k" in details["preprocessing"]["origin"]
    assert record["config"]["data"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert details["images_evaluated"] == 12
    assert metrics["acc1"] == 100.0 * details["correct"]["top1"] / 12
