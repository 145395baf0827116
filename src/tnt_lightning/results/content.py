"""What a folder dataset holds, as an identity: per split, its image count and a fingerprint of its
file list.

Experiments, pretrained backbones and trained methods are identified by the data's content, not
by where it lies: a moved or copied ImageNet is the same data, a 1,000-image subset of it is not.
The fingerprint hashes the sorted ``<class>/<file>`` names of a split (not the bytes: an image
replaced in place under the same name keeps it). Listing ImageNet's training split takes seconds, so
each split's result is cached under ``<cache_dir>/data_content/`` and reused while the modification
times of the split folder and of every class folder are unchanged (adding, removing or renaming a
file changes its folder's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .tempfiles import write_atomic

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FOLDER = "data_content"
# Bumped when the fingerprint's definition changes: cached fingerprints of the old one are ignored.
FINGERPRINT_VERSION = 1


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_folders(split: Path) -> list[os.DirEntry]:
    with os.scandir(split) as entries:
        return sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)


def _folder_times(split: Path, classes: list[os.DirEntry]) -> dict[str, int]:
    times = {".": split.stat().st_mtime_ns}
    times.update({c.name: c.stat().st_mtime_ns for c in classes})
    return times


def _list_split(split: Path, classes: list[os.DirEntry]) -> dict[str, Any]:
    digest = hashlib.sha256()
    images = 0
    progress = tqdm(classes, desc=f"listing {split}", unit="class", disable=len(classes) < 50, leave=False)
    for folder in progress:
        with os.scandir(folder.path) as entries:
            names = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
        for name in names:
            digest.update(f"{folder.name}/{name}\n".encode())
        images += len(names)
    return {"images": images, "files": digest.hexdigest()[:16]}


def split_content(split: str | Path, cache_dir: str | Path | None) -> dict[str, Any]:
    """The image count and file-list fingerprint of one split folder (``<split>/<class>/<image>``).

    Args:
        split: the split folder.
        cache_dir: where fingerprints are cached (None: not cached).

    Returns:
        ``{"images": N, "files": "<16 hex digits>"}``.
    """
    split = Path(split).expanduser().resolve()
    classes = _class_folders(split)
    times = _folder_times(split, classes)
    cache = None
    if cache_dir is not None:
        name = hashlib.sha256(str(split).encode()).hexdigest()[:16] + ".json"
        cache = Path(cache_dir).expanduser() / CACHE_FOLDER / name
        try:
            cached = json.loads(cache.read_text())
            if cached.get("version") == FINGERPRINT_VERSION and cached.get("times") == times:
                return cached["content"]
        except (OSError, ValueError, KeyError):
            pass
    content = _list_split(split, classes)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        entry = {"version": FINGERPRINT_VERSION, "split": str(split), "times": times, "content": content}
        write_atomic(cache, json.dumps(entry))
    log.info("data: %s holds %d images (file list %s)", split, content["images"], content["files"])
    return content


def folder_content(root: str | Path, splits: list[str], cache_dir: str | Path | None) -> dict[str, Any]:
    """:func:`split_content` of each of ``splits`` that exists under ``root``, by split name.

    Args:
        root: the dataset folder (``<root>/<split>/<class>/<image>``).
        splits: the split folder names the data config names.
        cache_dir: where fingerprints are cached (None: not cached).

    Returns:
        ``{split: {"images": N, "files": fingerprint}}`` for the splits present.
    """
    root = Path(root).expanduser()
    return {s: split_content(root / s, cache_dir) for s in dict.fromkeys(splits) if (root / s).is_dir()}


# Tried in this order when a folder data set's evaluation split (data.val_split) is left null.
EVAL_SPLIT_FALLBACKS = ("val", "validation", "test")


def data_content(data: dict[str, Any], cache_dir: str | Path | None) -> dict[str, Any] | None:
    """The content of the splits a folder data config may read (None: not a folder data set, or its
    folder is missing: the data module then says what is wrong).

    Args:
        data: a resolved ``data`` config with ``root``, ``train_split``, ``val_split``, ``test_split``.
        cache_dir: where fingerprints are cached (None: not cached).

    Returns:
        ``{split: {"images": N, "files": fingerprint}}``, or None.
    """
    root = data.get("root")
    if not root or root == "???" or not Path(str(root)).expanduser().is_dir():
        return None
    splits = [data.get("train_split") or "train", data.get("val_split"), data.get("test_split")]
    if data.get("val_split") is None:
        splits += EVAL_SPLIT_FALLBACKS
    return folder_content(root, [s for s in splits if s], cache_dir)
