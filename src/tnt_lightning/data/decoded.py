"""A folder data set's evaluation split decoded once: the centre crops as a memory-mapped uint8 array.

An evaluation of ImageNet's 50,000 validation images is data-bound (JPEG decoding and resizing),
and a sweep evaluates the same images hundreds of times. With ``data.decoded_cache=true`` the first
job decodes the split and applies the evaluation transform up to the centre crop (resize, crop),
into ``<cache_dir>/decoded/<key>.npy`` (N x H x W x C uint8, C = 3, or 1 for ``data.channels=1``);
later jobs read the crops from it and apply the rest of the transform (to tensor, normalise), batched.
The batches, hence the logits and the accuracy, are bitwise equal to decoding each time
(``tests/data/test_decoded_cache.py``). Training splits are never cached (their augmentation is
random).

**Key.** ``<key>`` hashes what the crops depend on: the split's content (its image count and
file-list fingerprint, :mod:`tnt_lightning.results.content`), the transform's pre-crop part (its
steps as timm builds them: resize size and interpolation, crop size and mode, plus
``image_size``, ``crop_pct``, ``crop_mode``, ``interpolation``), the channel mode (RGB or L), and
the versions of Pillow, torchvision and timm (the decoder and the resize). A renamed, added or
removed image gives a new key. An image replaced in place under the same name keeps the key (as
it keeps the experiment's); the size and modification time of every file, recorded at build,
catch that: such a cache is rebuilt, with a warning.

**Files.** ``<key>.npy`` (numpy's format: a header, then the array), ``<key>.npy.sha256`` (the
``sha256sum`` format, as ``models/artefact_io.py`` writes it), ``<key>.json`` (the file order,
labels, undecodable files, shape and the data file's size and mtime when last verified), and
``<key>.lock``. The array is written to a temporary name, renamed into place, its checksum
written, and the JSON last: a cache without its JSON is incomplete and rebuilt. The build runs
under a file lock, so the jobs of a sweep build it once; it decodes with the data loader's
workers, with a progress bar.

**Verification.** A full sha256 of ImageNet's cache (50,000 x 224 x 224 x 3 = 7.53 GB) reads it
all and hashes at about 0.8 GB/s on one core of the machines this was written on: about 9 s per
job, more from a cold disk, comparable to the model time of a job on a GPU. So a job checks on
load only what is cheap and catches what damage usually is: the JSON parses and describes this
split (files, labels, shape), the data file has the size the shape implies and a valid header,
and its size and modification time are the ones recorded at its last full check. Anything that
writes to the file (a flipped byte, a partial copy) changes its mtime, and a file whose
size or mtime moved is checked in full against its sha256 (then re-stamped if it matches: a copy
with ``cp`` is fine). Damage that leaves the mtime (a disk's bit rot) is found by the full check
on demand: ``python -m tnt_lightning.data.decoded verify [--cache-dir DIR] [--repair]``. A damaged
or incomplete cache is deleted, with a warning naming the file, and rebuilt.

**Bad images.** The build records undecodable files (with their error) instead of stopping; a job
then applies its own ``data.on_bad_image``: ``fail`` stops naming the file, ``skip`` logs each once,
leaves it out of its batch exactly as :func:`~tnt_lightning.data.folder.collate_decoded` does, and
counts it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from ..models.artefact_io import checksum_path, checksum_problem, write_checksum
from ..results.tempfiles import remove_stale_temps, temp_path, write_atomic

log = logging.getLogger(__name__)

CACHE_FOLDER = "decoded"
# Bumped when the layout or the key's definition changes: older caches get other keys.
CACHE_VERSION = 1
BUILD_BATCH = 64


class DecodedCacheError(OSError):
    """A decoded cache cannot be used: missing, incomplete, damaged, or of other images."""


def split_transform(transform: transforms.Compose) -> tuple[transforms.Compose, list[Any]]:
    """The evaluation transform split before its to-tensor step: (pre-crop part, the rest)."""
    steps = list(transform.transforms)
    for i, step in enumerate(steps):
        if type(step).__name__ in ("ToTensor", "MaybeToTensor"):
            return transforms.Compose(steps[:i]), steps[i:]
    raise ValueError(f"data.decoded_cache: the evaluation transform has no to-tensor step: {transform}")


class Finisher:
    """The rest of the evaluation transform (to tensor, normalise) on a batch of uint8 crops.

    The usual rest, ``[MaybeToTensor or ToTensor, Normalize]``, runs batched with exactly the
    operations torchvision runs per image (channels first, contiguous, float32, / 255, - mean,
    / std), so the values are bitwise the same; any other rest runs per image on a PIL image.
    """

    def __init__(self, rest: Sequence[Any]) -> None:
        self.rest = transforms.Compose(list(rest))
        kinds = [type(s).__name__ for s in rest]
        self.fast = kinds in (["MaybeToTensor", "Normalize"], ["ToTensor", "Normalize"])
        if self.fast:
            norm = rest[1]
            self.mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
            self.std = torch.as_tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, crops: np.ndarray) -> torch.Tensor:
        """``crops``: ``[B, H, W, C]`` uint8. Returns ``[B, C, H, W]`` float32."""
        if self.fast:
            images = (
                torch.from_numpy(np.require(crops, requirements=["C", "W"])).permute(0, 3, 1, 2).contiguous()
            )
            return images.to(torch.float32).div(255).sub_(self.mean).div_(self.std)
        pil = [Image.fromarray(c[..., 0] if c.shape[-1] == 1 else c) for c in crops]
        return torch.stack([self.rest(p) for p in pil])


def whole_batch(batch: Any) -> Any:
    """The collation of a data set that returns whole batches (``__getitems__``)."""
    return batch


class DecodedSplit(Dataset):
    """An evaluation split read from its decoded cache: ``(images, labels)`` per batch of indices.

    ``__getitems__`` serves the data loader a whole batch (one read of the memmap, one batched
    finish); ``__getitem__`` one ``(image, label)`` (``task=visualize``). The memmap is opened in
    each process on first use, never pickled to the loader's workers.
    """

    def __init__(self, path: Path, meta: dict[str, Any], finish: Finisher, on_bad_image: str) -> None:
        self.path, self.finish = path, finish
        self.root = Path(meta["split"])
        self.files: list[str] = meta["files"]
        self.labels = torch.as_tensor(meta["labels"], dtype=torch.long)
        self.bad: dict[int, str] = {int(i): why for i, why in meta["bad"].items()}
        self.on_bad_image = on_bad_image
        self._images: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    @property
    def bad_paths(self) -> list[str]:
        return [str(self.root / self.files[i]) for i in sorted(self.bad)]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from .folder import BadImageError  # folder.py imports this module

        kept = [i for i in indices if i not in self.bad]
        if not kept:
            raise BadImageError(
                f"none of the {len(indices)} images of a batch could be decoded (see the log)"
            )
        first, last = kept[0], kept[-1]
        if last - first + 1 == len(kept):  # consecutive: one slice of the memmap
            crops = np.array(self.images[first : last + 1])  # a copy: the memmap is read-only
        else:
            crops = self.images[np.asarray(kept)]
        return self.finish(crops), self.labels[kept]

    def __getitem__(self, index: int):
        if index in self.bad:
            return None
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])


class _PreCrop(Dataset):
    """The build's data set: sample ``i`` decoded and cropped, as uint8 ``[H, W, C]`` (or its error)."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, pre_crop: transforms.Compose) -> None:
        self.samples, self.mode, self.pre_crop = samples, mode, pre_crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        from .folder import BadImageError, load_rgb

        try:
            image = self.pre_crop(load_rgb(self.samples[index][0], self.mode))
        except BadImageError as e:
            return index, None, str(e)
        crop = np.asarray(image, dtype=np.uint8)
        return index, crop.reshape(crop.shape[0], crop.shape[1], -1), None


def cache_key(
    content: dict[str, Any], pre_crop: transforms.Compose, mode: str, settings: dict[str, Any]
) -> str:
    """The cache's key: what the crops depend on (the module's doc)."""
    import PIL
    import timm
    import torchvision

    fields = {
        "version": CACHE_VERSION,
        "content": {"images": content["images"], "files": content["files"]},
        "pre_crop": " ".join(repr(pre_crop).split()),
        "settings": settings,
        "mode": mode,
        "decoder": {
            "pillow": PIL.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
        },
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def files_stamp(samples: list[tuple[str, int]]) -> str:
    """A fingerprint of every file's size and modification time (an image replaced in place)."""
    digest = hashlib.sha256()
    for path, _ in samples:
        st = os.stat(path)
        digest.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _file_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _header_bytes(shape: tuple[int, ...]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def expected_size(shape: tuple[int, ...]) -> int:
    return len(_header_bytes(shape)) + int(np.prod(shape))


class DecodedCache:
    """The decoded cache of one evaluation split: where it lies, whether it is sound, how to build it.

    Args:
        cache_dir: ``paths.cache_dir`` (the cache goes under ``<cache_dir>/decoded/``).
        split: the split folder.
        samples: its ``(path, label)`` pairs in the data set's order (ImageFolder's).
        content: the split's ``{"images", "files"}`` (:func:`~tnt_lightning.results.content.split_content`).
        transform: the split's full evaluation transform.
        mode: ``RGB`` or ``L``.
        image_size: the crop's side.
        settings: the preprocessing values the crop depends on (for the key).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        split: Path,
        samples: list[tuple[str, int]],
        content: dict[str, Any],
        transform: transforms.Compose,
        mode: str,
        image_size: int,
        settings: dict[str, Any],
    ) -> None:
        self.split, self.samples, self.mode = Path(split), samples, mode
        self.pre_crop, rest = split_transform(transform)
        self.finish = Finisher(rest)
        self.key = cache_key(content, self.pre_crop, mode, {**settings, "image_size": image_size})
        folder = Path(cache_dir).expanduser() / CACHE_FOLDER
        self.path = folder / f"{self.key}.npy"
        self.meta_path = folder / f"{self.key}.json"
        self.lock_path = folder / f"{self.key}.lock"
        self.shape = (len(samples), image_size, image_size, 1 if mode == "L" else 3)
        self.files = [os.path.relpath(p, self.split) for p, _ in samples]
        self.labels = [int(label) for _, label in samples]

    def load(self, num_workers: int, on_bad_image: str) -> DecodedSplit:
        """The split from the cache; built first (once, under the lock) when missing or damaged."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path)):
            try:
                meta = self.check()
            except DecodedCacheError as e:
                if self.meta_path.exists() or self.path.exists():
                    log.warning(
                        "decoded cache %s cannot be used: %s; deleting and rebuilding it", self.path, e
                    )
                self.remove()
                meta = self.build(num_workers)
        return DecodedSplit(self.path, meta, self.finish, on_bad_image)

    def remove(self) -> None:
        for p in (self.meta_path, self.path, checksum_path(self.path)):
            p.unlink(missing_ok=True)

    def check(self, full: bool = False) -> dict[str, Any]:
        """The cache's JSON once the cheap checks pass (and the full sha256 when the data file's size
        or mtime moved since its last full check, or ``full``).

        Raises:
            DecodedCacheError: saying what is missing or wrong.
        """
        try:
            meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise DecodedCacheError("not built (no JSON)") from None
        except (OSError, ValueError) as e:
            raise DecodedCacheError(f"its JSON {self.meta_path} is unreadable: {e}") from None
        expected = {"version": CACHE_VERSION, "key": self.key, "shape": list(self.shape)}
        for field, value in expected.items():
            if meta.get(field) != value:
                raise DecodedCacheError(f"its JSON says {field} {meta.get(field)!r}, expected {value!r}")
        if meta.get("files") != self.files or meta.get("labels") != self.labels:
            raise DecodedCacheError("its JSON lists other files or labels than the split holds")
        if meta.get("files_stamp") != files_stamp(self.samples):
            raise DecodedCacheError(f"images under {self.split} were replaced since it was built")
        if not self.path.is_file() or not checksum_path(self.path).is_file():
            raise DecodedCacheError(f"{self.path} or its checksum is missing")
        size = self.path.stat().st_size
        if size != expected_size(self.shape):
            raise DecodedCacheError(f"{self.path} holds {size} bytes, {expected_size(self.shape)} expected")
        try:
            header = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DecodedCacheError(f"{self.path} is not a readable .npy array: {e}") from None
        if header.shape != self.shape or header.dtype != np.uint8:
            raise DecodedCacheError(
                f"{self.path} holds {header.dtype} {header.shape}, expected uint8 {self.shape}"
            )
        if full or meta.get("verified_stat") != _file_stat(self.path):
            problem = checksum_problem(self.path)
            if problem:
                raise DecodedCacheError(f"{self.path}: {problem}")
            meta["verified_stat"] = _file_stat(self.path)
            write_atomic(self.meta_path, json.dumps(meta))
            log.info("decoded cache %s: full sha256 check passed", self.path)
        return meta

    def build(self, num_workers: int) -> dict[str, Any]:
        """Decode and crop every image of the split into the cache (the module's doc); its JSON."""
        needed = expected_size(self.shape)
        free = shutil.disk_usage(self.path.parent).free
        if free < needed:
            raise DecodedCacheError(
                f"{self.path.parent} has {free / 1e9:.2f} GB free; the decoded cache needs "
                f"{needed / 1e9:.2f} GB"
            )
        log.info(
            "data.decoded_cache: decoding %d images of %s once into %s (%.2f GB)",
            len(self.samples),
            self.split,
            self.path,
            needed / 1e9,
        )
        remove_stale_temps(self.path)
        loader = DataLoader(
            _PreCrop(self.samples, self.mode, self.pre_crop),
            batch_size=BUILD_BATCH,
            num_workers=num_workers,
            collate_fn=whole_batch,
        )
        digest, bad = hashlib.sha256(), {}
        tmp = temp_path(self.path)
        header = _header_bytes(self.shape)
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                digest.update(header)
                progress = tqdm(total=len(self.samples), desc="decoding once", unit="img", leave=False)
                for batch in loader:
                    block = np.zeros((len(batch), *self.shape[1:]), dtype=np.uint8)
                    for row, (index, crop, error) in enumerate(batch):
                        if crop is None:
                            bad[index] = error
                        elif crop.shape != self.shape[1:]:
                            raise DecodedCacheError(
                                f"{self.samples[index][0]} crops to {crop.shape}, expected {self.shape[1:]}"
                            )
                        else:
                            block[row] = crop
                    data = block.tobytes()
                    f.write(data)
                    digest.update(data)
                    progress.update(len(batch))
                progress.close()
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        write_checksum(self.path, digest.hexdigest())
        meta = {
            "version": CACHE_VERSION,
            "key": self.key,
            "split": str(self.split),
            "shape": list(self.shape),
            "pre_crop": " ".join(repr(self.pre_crop).split()),
            "mode": self.mode,
            "files": self.files,
            "labels": self.labels,
            "bad": {str(i): why for i, why in sorted(bad.items())},
            "files_stamp": files_stamp(self.samples),
            "verified_stat": _file_stat(self.path),
        }
        write_atomic(self.meta_path, json.dumps(meta))
        log.info("data.decoded_cache: built %s", self.path)
        return meta


def verify_all(cache_dir: Path, repair: bool) -> int:
    """Full sha256 of every decoded cache under ``cache_dir``; with ``repair`` damaged ones are
    deleted (the next job rebuilds them). Returns the number of damaged caches."""
    folder = cache_dir.expanduser() / CACHE_FOLDER
    damaged = 0
    for path in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
        problem = checksum_problem(path) if checksum_path(path).is_file() else "no checksum beside it"
        meta = path.with_suffix(".json")
        if problem is None and not meta.is_file():
            problem = f"no {meta.name} beside it (an interrupted build)"
        if problem is None:
            print(f"ok       {path} ({path.stat().st_size / 1e9:.2f} GB)")
            continue
        damaged += 1
        print(f"DAMAGED  {path}: {problem}" + ("; deleted" if repair else ""))
        if repair:
            for p in (meta, path, checksum_path(path)):
                p.unlink(missing_ok=True)
    return damaged


def main(argv: Sequence[str] | None = None) -> int:
    root = Path(os.environ.get("TNT_ROOT", "."))
    parser = argparse.ArgumentParser(
        prog="python -m tnt_lightning.data.decoded", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="full sha256 check of every decoded cache")
    verify.add_argument("--cache-dir", type=Path, default=root / "cache")
    verify.add_argument("--repair", action="store_true", help="delete damaged caches (rebuilt on next use)")
    args = parser.parse_args(argv)
    return 1 if verify_all(args.cache_dir, args.repair) else 0


if __name__ == "__main__":
    sys.exit(main())
