"""Token maps (``task=visualize``): the drawing on hand-made sources, and the task end to end."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import SHORT_PRETRAIN, compose_config, run_py
from tnt_lightning.data.mnist import MNIST_MEAN, MNIST_STD
from tnt_lightning.errors import ConfigError
from tnt_lightning.results import read_records
from tnt_lightning.tasks import run_task
from tnt_lightning.tasks.token_maps import (
    DPI,
    GREY,
    GREY_ALPHA,
    HEADER_INCHES,
    MERGE_ALPHA,
    PALETTE,
    PANEL_INCHES,
    patch_owners,
    render_token_map,
    to_rgb,
)


def png_size(rows: int, cols: int) -> tuple[int, int]:
    """Pixel (width, height) of a token-map figure with this grid."""
    return round(cols * PANEL_INCHES * DPI), round((rows * PANEL_INCHES + HEADER_INCHES) * DPI)


def source_of(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.bool)


def test_dropped_patch_is_greyed_and_merged_patches_share_a_colour():
    # 2x2 patches of 2x2 pixels, a CLS token; survivors: CLS, patch 0 alone, patches 2+3 merged.
    source = source_of([[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 1]])
    owners = patch_owners(source, num_prefix=1)
    assert owners.tolist() == [[0, -1, 1, 1]]
    image = np.random.default_rng(0).uniform(size=(4, 4, 3))
    out = render_token_map(image, owners[0], (2, 2))

    np.testing.assert_allclose(out[:2, :2], image[:2, :2])  # kept alone: untouched
    np.testing.assert_allclose(out[:2, 2:], (1 - GREY_ALPHA) * image[:2, 2:] + GREY_ALPHA * GREY)
    tint = (out[2:] - (1 - MERGE_ALPHA) * image[2:]) / MERGE_ALPHA
    np.testing.assert_allclose(tint, np.broadcast_to(PALETTE[0], tint.shape))  # one colour, both patches
    assert not np.allclose(PALETTE[0], GREY)


def test_merged_groups_get_distinct_colours_in_order_of_their_first_patch():
    image = np.zeros((4, 4, 3))
    two_groups = render_token_map(image, np.array([3, 3, 1, 1]), (2, 2))
    assert not np.allclose(two_groups[0, 0], two_groups[3, 0])
    np.testing.assert_allclose(two_groups[0, 0], MERGE_ALPHA * PALETTE[0])
    np.testing.assert_allclose(two_groups[3, 0], MERGE_ALPHA * PALETTE[1])
    # The same grouping under other token indices is drawn the same.
    np.testing.assert_allclose(render_token_map(image, np.array([0, 0, 5, 5]), (2, 2)), two_groups)


def test_weighted_source_gives_a_patch_to_its_heaviest_token_and_prefix_rows_own_nothing():
    source = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 0.2, 0.0, 0.0], [0.0, 0.7, 1.0, 0.0]]])
    assert patch_owners(source, num_prefix=1).tolist() == [[1, 1, -1]]


def test_to_rgb_undoes_mnist_normalisation_into_three_channels():
    pixels = torch.tensor([0.0, 0.25, 1.0]).view(1, 1, 1, 3).expand(2, 1, 28, 3)
    rgb = to_rgb((pixels - MNIST_MEAN) / MNIST_STD, (MNIST_MEAN,), (MNIST_STD,))
    assert rgb.shape == (2, 28, 3, 3)
    np.testing.assert_allclose(rgb[0, 0], [[0.0] * 3, [0.25] * 3, [1.0] * 3], atol=1e-6)


def printed_png(stdout: str) -> Path:
    (path,) = re.findall(r"token maps: (\S+\.png)", stdout)
    return Path(path)


def assert_png(path: Path, rows: int, cols: int) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == png_size(rows, cols)


def test_topk_on_the_embedded_default_through_run_py(default_run, tmp_path):
    cache = default_run[0] / "cache"
    proc = run_py(
        [
            "task=visualize",
            "method=topk",
            "keep_rate=0.5",
            f"paths.cache_dir={cache}",
            "visualize.num_images=3",
            *SHORT_PRETRAIN,
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = printed_png(proc.stdout)
    assert path.is_relative_to(tmp_path / "outputs") and path.parent.name == "token_maps"
    assert_png(path, rows=3, cols=2)
    (record,) = read_records(tmp_path / "results")
    assert record["status"] == "ok" and record["task"] == "visualize" and record["method"] == "topk"
    d = record["details"]
    assert d["png"] == str(path) and d["grid"] == [3, 2]
    assert d["steps"] == ["inside block 1"] and d["tokens_per_step"] == [24]  # int(49 * 0.5)


@pytest.mark.parametrize(
    "steps,grid,tokens", [("all", [2, 7], [45, 41, 37, 33, 29, 25]), ("final", [2, 2], [25])]
)
def test_tome_multi_layer_draws_every_step_or_the_last(default_run, tmp_path, steps, grid, tokens):
    cfg = compose_config(
        [
            "task=visualize",
            "method=tome",
            "schedule=multi",
            "method.r=4",
            "visualize.num_images=2",
            f"visualize.steps={steps}",
            f"paths.cache_dir={default_run[0] / 'cache'}",
            *SHORT_PRETRAIN,
        ],
        tmp_path,
    )
    record = run_task(cfg)
    d = record["details"]
    assert d["grid"] == grid and d["tokens_per_step"][-len(tokens) :] == tokens
    assert Path(d["png"]).parent == tmp_path / "out" / "token_maps"
    assert_png(Path(d["png"]), *grid)


def test_imagefolder_with_a_random_weight_deit(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    cfg = compose_config(
        [
            "task=visualize",
            "data=imagefolder",
            f"data.root={tmp_path / 'data'}",
            "data.num_workers=0",
            "model=deit_tiny",
            "model.weights=random",
            "model.num_classes=2",
            "method=evit",
        ],
        tmp_path,
    )
    record = run_task(cfg)
    d = record["details"]
    # 8 images asked, the val split has 4; DeiT-Tiny: 196 patches, EViT keeps int(196 * 0.5) + a fused one.
    assert d["grid"] == [4, 2] and sorted(d["image_indices"]) == [0, 1, 2, 3]
    assert d["tokens_per_step"] == [99] and d["weights"] == "random"
    assert_png(Path(d["png"]), rows=4, cols=2)


@pytest.mark.parametrize(
    "override,message",
    [
        ("visualize.num_images=0", "visualize.num_images=0 is not allowed: an integer >= 1"),
        ("visualize.steps=some", "visualize.steps='some' is not allowed: one of ['all', 'final']"),
        ("visualize.split=test", "visualize.split='test' is not allowed: one of ['val', 'train']"),
        ("method=none", "method='none' is not allowed"),
        ("data=synthetic", "data=synthetic is not allowed for task=visualize"),
    ],
)
def test_bad_settings_fail_before_any_model_is_built(override, message, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr("tnt_lightning.tasks.evaluate.create_model", no_model)
    cfg = compose_config(["task=visualize", "method=topk", override], tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_task(cfg)


def test_learned_method_on_random_weights_is_refused_before_training(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the refusal")

    monkeypatch.setattr("tnt_lightning.tasks.evaluate.create_model", no_model)
    overrides = ["task=visualize", "method=tnt", "model=vit_mnist", "model.weights=random"]
    refused = r"would first train tnt for 10 epochs .*random weights.*allow_random"
    with pytest.raises(ConfigError, match=refused):
        run_task(compose_config(overrides, tmp_path))


def test_token_map_titles_say_when_weights_are_not_the_release():
    from tnt_lightning.tasks.visualize import weights_label

    assert weights_label("random") == " (random weights)"
    assert weights_label("checkpoint:/me/my_deit.pth") == " (weights: my_deit.pth)"
    assert weights_label("hub:deit_tiny_patch16_224") == "" and weights_label("pretrain:/c/x.pth") == ""


def test_cluttered_mnist_maps_record_the_share_of_each_patch_kind_kept(tmp_path):
    """Random drop keeps about K of blank, clutter and digit patches alike, over all 1000 held-out
    canvases; the record and the printed line carry the shares (the embedded study's diagnostic)."""
    cfg = compose_config(
        [
            "task=visualize",
            "data=cluttered_mnist",
            "data.train_copies=1",
            "model=vit_cmnist",
            "model.weights=random",
            "method=random",
            "keep_rate=0.3",
        ],
        tmp_path,
    )
    kept = run_task(cfg)["details"]["kept_by_kind"]
    assert sorted(kept) == ["blank", "clutter", "digit"]
    assert all(abs(share - 0.3) < 0.03 for share in kept.values()), kept
