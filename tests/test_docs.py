"""The project carries its own method reference: no tracked file points outside the repository."""

from __future__ import annotations

import subprocess

from helpers import ROOT

OUTSIDE = ("METHODS.md", "METHODS_EXTRA.md", "../shared", "shared/SLURM.md", "shared/paper")


def test_no_tracked_file_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    hits = []
    for name in files.split():
        path = ROOT / name
        if name == "tests/test_docs.py" or not path.is_file() or path.suffix in (".png", ".pth", ".jpg"):
            continue
        text = path.read_text(errors="replace")
        hits += [f"{name}: {needle}" for needle in OUTSIDE if needle in text]
    assert not hits, hits
