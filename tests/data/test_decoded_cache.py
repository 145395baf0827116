"""data.decoded_cache: an evaluation split decoded once into a memory-mapped uint8 array of its crops,
with bitwise the same batches and accuracy, read (not rebuilt) by later jobs, rebuilt when damaged
or when the folder changes (data/decoded.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_vit
from tnt_lightning.data import BadImageError, ImageFolderDataModule
from tnt_lightning.data.decoded import DecodedCache, DecodedSplit, verify_all
from tnt_lightning.results.identity import DEIT_PREPROCESSING

CLASSES = ("cat", "dog", "fox")


def make_folder(root: Path, per_class: int = 5) -> Path:
    """``val/`` (and a small ``train/``): JPEGs and a PNG of assorted sizes and modes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", per_class)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = int(rng.integers(36, 80)), int(rng.integers(36, 80))
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                image = Image.fromarray(pixels).convert("L" if i == 1 else "RGB")
                image.save(folder / f"{i}.jpg", format="PNG" if i == 2 else "JPEG", quality=90)
    return root


def module(root: Path, cache_dir: Path | None, cached: bool, **kwargs) -> ImageFolderDataModule:
    settings = dict(image_size=32, eval_batch_size=4, num_workers=0, pin_memory=False)
    preprocess = {**DEIT_PREPROCESSING, **kwargs.pop("preprocess", {})}
    dm = ImageFolderDataModule(
        root=str(root),
        preprocess=preprocess,
        decoded_cache=cached,
        cache_dir=None if cache_dir is None else str(cache_dir),
        **{**settings, **kwargs},
    )
    dm.setup("test")
    return dm


def batches(dm: ImageFolderDataModule) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(dm.test_dataloader())


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape == xb.shape and xa.dtype == xb.dtype and xa.is_contiguous() and xb.is_contiguous()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "decoded").glob("*.npy"))


@pytest.mark.parametrize(
    "channels, crop_mode, workers",
    [(3, "center", 0), (1, "border", 0), (3, "squash", 2)],
)
def test_batches_logits_and_accuracy_are_bitwise_those_of_decoding(tmp_path, channels, crop_mode, workers):
    root = make_folder(tmp_path / "data")
    options = dict(channels=channels, num_workers=workers, preprocess={"crop_mode": crop_mode})
    plain = batches(module(root, None, False, **options))
    dm = module(root, tmp_path / "cache", True, **options)
    assert isinstance(dm._datasets["val"], DecodedSplit)
    cached = batches(dm)
    assert_same_batches(plain, cached)
    assert len(cache_files(tmp_path / "cache")) == 1
    # a second job reads the cache: the same batches again
    assert_same_batches(plain, batches(module(root, tmp_path / "cache", True, **options)))

    model = tiny_vit(img=32, num_classes=len(CLASSES))
    if channels == 1:
        model.patch_embed.proj = torch.nn.Conv2d(1, 48, 8, 8)
    with torch.no_grad():
        logits = [(model(x), y) for x, y in plain], [(model(x), y) for x, y in cached]
    for (la, _), (lb, _) in zip(*logits, strict=True):
        assert torch.equal(la, lb)
    correct = [sum(int((out.argmax(1) == y).sum()) for out, y in run) for run in logits]
    assert correct[0] == correct[1]
    # one image at a time (task=visualize) is the same too
    single = dm._datasets["val"][5]
    assert torch.equal(single[0], plain[1][0][1]) and single[1] == int(plain[1][1][1])


def test_a_second_job_reads_the_cache_and_does_not_rebuild_it(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    first = batches(module(root, tmp_path / "cache", True))

    def no_build(self, num_workers):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(DecodedCache, "build", no_build)
    assert_same_batches(first, batches(module(root, tmp_path / "cache", True)))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


def _flip_byte(path: Path) -> None:
    stamp = path.stat().st_mtime_ns
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 7)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    # a write moves the mtime; on a file system with coarse timestamps, make sure it moved
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))


def _damage_meta(path: Path) -> None:
    path.with_suffix(".json").write_text("{not json")


@pytest.mark.parametrize("damage", [_truncate, _flip_byte, _damage_meta])
def test_a_damaged_cache_is_found_and_rebuilt_with_a_warning(tmp_path, caplog, monkeypatch, damage):
    root = make_folder(tmp_path / "data")
    plain = batches(module(root, None, False))
    module(root, tmp_path / "cache", True)
    [path] = cache_files(tmp_path / "cache")
    damage(path)
    builds = []
    original = DecodedCache.build
    monkeypatch.setattr(DecodedCache, "build", lambda self, n: builds.append(1) or original(self, n))
    with caplog.at_level(logging.WARNING):
        rebuilt = batches(module(root, tmp_path / "cache", True))
    assert builds == [1]
    assert any(f"decoded cache {path} cannot be used" in r.message for r in caplog.records)
    assert_same_batches(plain, rebuilt)
    assert verify_all(tmp_path / "cache", repair=False) == 0


def test_damage_that_keeps_the_mtime_is_left_to_the_full_check_on_demand(tmp_path, capsys):
    """The documented trade-off: a load checks sizes, the header and the mtime of the last full
    check; a flipped byte whose mtime is put back (bit rot) is found by ``verify``."""
    root = make_folder(tmp_path / "data")
    module(root, tmp_path / "cache", True)
    [path] = cache_files(tmp_path / "cache")
    stamp = path.stat().st_mtime_ns
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x01\x02\x03")
    os.utime(path, ns=(stamp, stamp))
    module(root, tmp_path / "cache", True)  # not noticed on load
    assert verify_all(tmp_path / "cache", repair=True) == 1
    assert "DAMAGED" in capsys.readouterr().out and not path.exists()
    plain = batches(module(root, None, False))
    assert_same_batches(plain, batches(module(root, tmp_path / "cache", True)))  # rebuilt


@pytest.mark.parametrize("change", ["rename", "add", "replace"])
def test_a_changed_folder_gets_a_new_cache(tmp_path, change, caplog):
    root = make_folder(tmp_path / "data")
    module(root, tmp_path / "cache", True)
    [before] = cache_files(tmp_path / "cache")
    image = root / "val" / "dog" / "0.jpg"
    if change == "rename":
        image.rename(image.with_name("9.jpg"))
    elif change == "add":
        Image.new("RGB", (50, 40), (200, 10, 10)).save(image.with_name("new.jpg"))
    else:  # the same name, other pixels: the same key, caught by the files' sizes and mtimes
        Image.new("RGB", (50, 40), (10, 200, 10)).save(image)
        stat = image.stat()
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING):
        cached = batches(module(root, tmp_path / "cache", True))
    assert_same_batches(batches(module(root, None, False)), cached)
    after = cache_files(tmp_path / "cache")
    if change == "replace":
        assert after == [before] and any("were replaced" in r.message for r in caplog.records)
    else:
        assert len(after) == 2 and before in after


def _bad_images(root: Path) -> list[Path]:
    folder = root / "val" / "cat"
    truncated, garbage = folder / "3.jpg", folder / "garbage.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage.write_bytes(b"not an image" * 20)
    return sorted([truncated, garbage])


def test_bad_images_are_skipped_and_counted_as_without_the_cache(tmp_path, caplog):
    root = make_folder(tmp_path / "data")
    bad = _bad_images(root)
    plain_dm = module(root, None, False, on_bad_image="skip")
    plain = batches(plain_dm)
    for _ in range(2):  # the job that builds, and one that reads
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            dm = module(root, tmp_path / "cache", True, on_bad_image="skip")
            cached = batches(dm)
        assert_same_batches(plain, cached)
        assert dm.bad_images == plain_dm.bad_images == 2
        assert dm.bad_image_paths == plain_dm.bad_image_paths == [str(p) for p in bad]
        assert sum("skipping" in r.message for r in caplog.records) == 2
    with pytest.raises(BadImageError, match=r"cannot decode image .*(3|garbage)\.jpg.*on_bad_image=skip"):
        module(root, tmp_path / "cache", True, on_bad_image="fail")


def test_training_splits_are_never_cached(tmp_path):
    dm = module(make_folder(tmp_path / "data"), tmp_path / "cache", True)
    dm.setup("fit")
    assert not isinstance(dm._datasets["train"], DecodedSplit)
    assert isinstance(dm._datasets["val"], DecodedSplit)
    assert len(cache_files(tmp_path / "cache")) == 1


def test_without_room_for_the_cache_it_decodes_each_time(tmp_path, monkeypatch, caplog):
    root = make_folder(tmp_path / "data")
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 10})())
    with caplog.at_level(logging.WARNING):
        dm = module(root, tmp_path / "cache", True)
    assert not isinstance(dm._datasets["val"], DecodedSplit)
    assert any("decoding" in r.message and "each time" in r.message for r in caplog.records)
