"""What a run shows its user: `--help`, no library banners, the progress bar, a duration estimate,
the summary line, wandb run names."""

from __future__ import annotations

import re

from helpers import run_py
from tnt_lightning.config import Task


def test_help_lists_every_task(tmp_path):
    proc = run_py(["--help"], tmp_path, timeout=120)
    assert proc.returncode == 0
    listed = re.findall(r"^  (\w+) {2,}", proc.stdout.split("Tasks (task=...):", 1)[1], re.M)
    assert set(listed) >= {t.value for t in Task}, proc.stdout[:1500]


def test_wandb_run_names_say_what_ran(compose_cfg):
    from tnt_lightning.tasks.common import wandb_run_fields

    def name(*overrides: str) -> str:
        cfg = compose_cfg("logger=wandb", *overrides)
        return wandb_run_fields(cfg, cfg.logger.wandb)["name"]

    assert name() == "eval-vit_mnist-none"
    assert name("task=pretrain") == "pretrain-vit_mnist"
    assert name("method=topk", "keep_rate=0.3") == "eval-vit_mnist-topk-K0.3"


NOISE = (
    *("GPU available", "litlogger", "LeafSpec", "does not have many workers", "wandb:", "💡"),
    "Test metric",  # Lightning's metric box, which repeats the summary
)


def test_default_run_prints_no_library_banner(default_run):
    """`python run.py` as the README says: its output holds none of the silenced lines, once each."""
    _, proc = default_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in out], [
        line for line in out.splitlines() if any(n in line for n in NOISE)
    ]
    assert "eval: vit_mnist / none (keep_rate=1.0) on mnist" in proc.stdout


def test_quiet_silences_lightning_info_and_verbose_leaves_it():
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401

    from tnt_lightning.tasks.quiet import quiet

    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        with warnings.catch_warnings():
            quiet(verbose=True)
            assert logger.level == logging.INFO
            quiet(verbose=False)
            assert logger.level == logging.WARNING
            assert any(f[1] is not None and "LeafSpec" in f[1].pattern for f in warnings.filters)
    finally:
        logger.setLevel(level)


def tiny_module():
    """A one-Linear LightningModule: what the trainer tests fit."""
    import lightning as L
    import torch

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, _):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def test_training_progress_bar_shows_the_epoch_out_of_the_total(compose_cfg, capsys):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from tnt_lightning.tasks.common import make_trainer

    cfg = compose_cfg("trainer=cpu")
    trainer = make_trainer(cfg, max_epochs=3, enable_checkpointing=False)
    trainer.fit(tiny_module(), DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2))
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "Epoch 1/3" in shown and "Epoch 3/3" in shown


def test_a_training_logs_an_estimate_of_its_duration(compose_cfg, caplog):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from tnt_lightning.lit.estimate import TrainingTimeEstimate
    from tnt_lightning.tasks.common import make_trainer

    trainer = make_trainer(compose_cfg("trainer=cpu"), max_epochs=4, enable_checkpointing=False)
    with caplog.at_level("WARNING", logger="tnt_lightning.lit.estimate"):
        trainer.fit(tiny_module(), DataLoader(TensorDataset(torch.ones(16, 2)), batch_size=2))
    (estimate,) = [c for c in trainer.callbacks if isinstance(c, TrainingTimeEstimate)]
    assert estimate.estimate_s is not None and estimate.estimate_s > 0
    (line,) = [r.getMessage() for r in caplog.records if "training time estimate" in r.getMessage()]
    assert "4 epoch(s) of 8 steps" in line, line


def test_the_summary_names_the_paper_protocol_only_when_it_ran(compose_cfg):
    from tnt_lightning.tasks.common import format_summary

    def summary(warmup: int, iters: int) -> str:
        tp = dict(mode="paper", warmup=warmup, iters=iters, batch_size=32, device="cpu", threads=2)
        record = dict(
            task="eval", model="vit_mnist", method="none", keep_rate=1.0, data="mnist", status="ok",
            run_id="r", metrics={"throughput_img_s": 10.0}, details={"throughput": tp},
        )  # fmt: skip
        return format_summary(record)

    assert "(paper, batch 32" in summary(50, 30)
    assert "(5 warm-up + 10 timed passes, batch 32" in summary(5, 10) and "paper" not in summary(5, 10)
