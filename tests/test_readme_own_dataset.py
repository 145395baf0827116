"""The README's "Your own dataset" commands, run as written on a small generated folder of JPEGs.

Only cost is reduced (one pretraining epoch, small batches, no throughput timing); the commands,
the ``train/`` + ``test/`` layout (no ``val/``) and the report step are the README's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import ROOT, run_py
from tnt_lightning.results import read_records

CHEAP = [
    "model.pretrain.epochs=1",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "measure.throughput=false",
    "trainer.log_every_n_steps=1",
]


def readme_commands() -> tuple[str, list[str]]:
    """The DATA=... line and the three commands of the README's own-dataset section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own dataset", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    (data_line,) = [line for line in lines if line.startswith("DATA=")]
    return shlex.split(data_line[len("DATA=") :])[0], [line for line in lines if line.startswith("python")]


def make_jpeg_folder(root: Path, classes: int = 3) -> Path:
    """``train/`` and ``test/`` with one folder per class of 40x40 JPEGs, each class its own colour."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 6)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.normal(60, 25, (40, 40, 3))
                pixels[:, :, c] += 120
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                image.save(folder / f"{i}.jpg", quality=90)
    return root


def test_readme_own_dataset_commands_run_as_written(tmp_path):
    data_args, commands = readme_commands()
    assert len(commands) == 3, commands
    images = make_jpeg_folder(tmp_path / "my_images")
    data_args = data_args.replace("/path/to/images", str(images)).replace("num_classes=10", "num_classes=3")
    work = tmp_path / "work"
    work.mkdir()
    for command in commands:
        args = [a for a in shlex.split(command.replace("$DATA", data_args))]
        if args[:2] == ["python", "run.py"]:
            proc = run_py([*args[2:], *CHEAP], work, timeout=900)
        else:
            env = {**os.environ, "TNT_ROOT": str(work)}
            proc = subprocess.run(
                [sys.executable, *args[1:]], cwd=work, env=env, capture_output=True, text=True
            )
        assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
    records = read_records(work / "results")
    assert {r["status"] for r in records} == {"ok"}
    pretrain, *evals = records
    assert pretrain["task"] == "pretrain" and pretrain["data"] == "imagefolder"
    curves = [p.read_text() for p in (work / "outputs").rglob("metrics.csv")]
    assert any("train/loss" in c and "val/acc1" in c for c in curves), "task=pretrain logs its curves"
    assert {(r["method"], r["keep_rate"]) for r in evals} >= {("random", 0.5), ("topk", 0.7), ("tome", 0.5)}
    assert all(r["details"]["weights"].startswith("pretrain:") for r in evals)
    (backbone,) = (work / "cache" / "backbones").glob("vit_scratch-*.pth")
    assert all(backbone.name in r["details"]["weights"] for r in evals), "one backbone, trained once"
    report = (work / "reports" / "results.md").read_text()
    assert "vit_scratch on imagefolder" in report
