"""``python -m tnt_lightning.data.check ROOT``: decode every image under a dataset folder, list the bad ones.

Run it once on a new dataset (`make check-data DATA=ROOT`) instead of finding a truncated JPEG
halfway through an evaluation. Exit status 0 when every image decodes, 1 when some do not.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .folder import DECODE_ERRORS, IMAGE_EXTENSIONS


def image_files(root: Path) -> list[Path]:
    """Every file with an image extension under ``root``, in a stable order."""
    found = []
    for folder, _, names in os.walk(root):
        found += [Path(folder) / n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def bad_images(files: list[Path], progress: bool = True) -> list[tuple[Path, str]]:
    """``(path, reason)`` of each file PIL cannot fully decode."""
    bad = []
    for path in tqdm(files, desc="decoding", unit="img", disable=not progress):
        try:
            with Image.open(path) as image:
                image.convert("RGB")
        except DECODE_ERRORS as e:
            bad.append((path, f"{type(e).__name__}: {e}"))
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tnt_lightning.data.check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("root", type=Path, help="the dataset folder (data.root), or any folder of images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"{args.root} is not a folder", file=sys.stderr)
        return 2
    files = image_files(args.root)
    bad = bad_images(files, progress=not args.quiet)
    for path, reason in bad:
        print(f"BAD {path}: {reason}")
    print(f"{len(files)} images under {args.root}: {len(files) - len(bad)} decode, {len(bad)} bad")
    if bad:
        print("remove or replace them, or run with data.on_bad_image=skip to leave them out")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
