"""Resuming: a training or pretraining stopped after an epoch continues from that epoch.

In-process tests (fast) stop ``fit`` with an exception raised when epoch k starts, run it again and
count the steps the rerun trains; the resumed parameters must equal an uninterrupted run's, bit for
bit. The subprocess tests (slow: three ``run.py`` processes each) run ``run.py`` as a user would,
SIGKILL it as soon as a ``last.ckpt`` appears (before the last epoch), and check the rerun from
three sides: its log, its record, and the epochs Lightning's own progress bar shows it running.
A rerun that starts at epoch 0 fails every one of them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from helpers import ROOT, compose_config, run_py
from tnt_lightning.errors import ConfigError
from tnt_lightning.lit import LastCheckpoint
from tnt_lightning.models import create_model, pretrained_path
from tnt_lightning.results import read_records
from tnt_lightning.tasks import common, train
from tnt_lightning.tasks.common import pretrain_fn

EPOCHS = 3
# A small run: 30 digits per class (2 steps of 128 per epoch), validation on one batch of 100.
SMALL_DATA = ["+data.train_per_class=30", "data.eval_batch_size=100", "+trainer.limit_val_batches=1"]
SMALL_BACKBONE = ["model.pretrain.epochs=1", "+model.pretrain.data.train_per_class=20"]
TRAIN_ARGS = [
    "task=train",
    "method=tnt",
    f"data.train_overrides.epochs={EPOCHS}",
    *SMALL_DATA,
    *SMALL_BACKBONE,
]
PRETRAIN_ARGS = [
    "task=pretrain",
    f"model.pretrain.epochs={EPOCHS}",
    "+model.pretrain.data.train_per_class=30",
    "model.arch.depth=2",
    "+trainer.limit_val_batches=1",
]


def run_until_checkpoint(args: list[str], root: Path, pattern: str, timeout_s: float = 300) -> Path:
    """Start ``run.py args``, SIGKILL it the moment a file matching ``pattern`` appears under ``root``."""
    env = {**os.environ, "TNT_ROOT": str(root), "WANDB_MODE": "disabled"}
    with open(root / "killed_run.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run.py"), *args, "logger=csv"],
            cwd=root,
            env=env,
            stdout=out,
            stderr=out,
        )
        deadline = time.time() + timeout_s
        try:
            while not (found := list(root.glob(pattern))):
                assert proc.poll() is None, (
                    "the run ended before it could be killed:\n"
                    + ((root / "killed_run.log").read_text()[-3000:])
                )
                assert time.time() < deadline, f"no {pattern} after {timeout_s} s"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return found[0]


def epochs_run(output: str) -> list[int]:
    """The epochs Lightning's progress bar shows running (independent of the code under test)."""
    return sorted({int(n) for n in re.findall(r"Epoch (\d+):", output)})


def epochs_done(last: Path) -> int:
    return torch.load(last, map_location="cpu", weights_only=True)["resume"]["epochs_done"]


MAKE_TRAINER = common.make_trainer


class Stop(Exception):
    """Stands for a kill: raised when epoch ``stop_at`` starts, after the previous epoch's checkpoint."""


class StepCounter(L.Callback):
    """Counts the optimisation steps and full validations (not the sanity check) a training runs,
    and stops it when epoch ``stop_at`` starts."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.steps, self.validations = stop_at, 0, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.stop_at:
            raise Stop

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validations += not trainer.sanity_checking


def add_callback(monkeypatch, module, counter: StepCounter) -> None:
    """Make ``module``'s trainers carry ``counter`` too."""

    def with_counter(cfg, loggers=False, **overrides):
        return MAKE_TRAINER(cfg, loggers, **{**overrides, "callbacks": [*overrides["callbacks"], counter]})

    monkeypatch.setattr(module, "make_trainer", with_counter)


def test_training_stopped_after_epoch_1_resumes_there_to_the_uninterrupted_parameters(tmp_path, monkeypatch):
    cfg = compose_config(TRAIN_ARGS[1:], tmp_path)
    spec = instantiate(cfg.model)
    counter = StepCounter()
    add_callback(monkeypatch, train, counter)
    module, metrics = train.fit(cfg, spec, tmp_path / "straight", False)
    straight = {n: p.detach().clone() for n, p in module.reducer.trainable_parameters()}
    steps_per_epoch = counter.steps // EPOCHS
    assert metrics["resumed_from_epoch"] is None and steps_per_epoch > 0
    assert counter.validations == EPOCHS  # the last epoch's validation gives the metrics: none again

    counter = StepCounter()
    add_callback(monkeypatch, train, counter)
    _, again = train.fit(cfg, spec, tmp_path / "straight", False)  # resumed after its last epoch
    assert (counter.steps, counter.validations) == (0, 1)
    assert again["val_acc1"] == metrics["val_acc1"]

    counter = StepCounter(stop_at=1)
    add_callback(monkeypatch, train, counter)
    with pytest.raises(Stop):
        train.fit(cfg, spec, tmp_path / "stopped", False)
    assert counter.steps == steps_per_epoch
    assert epochs_done(tmp_path / "stopped" / "last.ckpt") == 1  # written when epoch 0 ended

    counter = StepCounter()
    add_callback(monkeypatch, train, counter)
    module, metrics = train.fit(cfg, spec, tmp_path / "stopped", False)
    assert counter.steps == (EPOCHS - 1) * steps_per_epoch  # not from epoch 0
    assert metrics["resumed_from_epoch"] == 1 and metrics["resumed_from_step"] == steps_per_epoch
    resumed = dict(module.reducer.trainable_parameters())
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_pretraining_stopped_after_epoch_1_resumes_there_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    cfg = compose_config(PRETRAIN_ARGS[1:], tmp_path)
    spec = instantiate(cfg.model)
    straight = create_model(spec)
    counter = StepCounter()
    add_callback(monkeypatch, common, counter)
    pretrain_fn(cfg)(straight, spec)  # no work folder: nothing kept
    steps_per_epoch = counter.steps // EPOCHS
    assert counter.validations == 1  # at the end of the fit only, and not again after it
    model = create_model(spec)
    add_callback(monkeypatch, common, StepCounter(stop_at=1))
    with pytest.raises(Stop):
        pretrain_fn(cfg)(model, spec, tmp_path / "work")
    counter = StepCounter()
    add_callback(monkeypatch, common, counter)
    model = create_model(spec)
    metrics = pretrain_fn(cfg)(model, spec, tmp_path / "work")
    assert metrics["resumed_from_epoch"] == 1 and counter.steps == (EPOCHS - 1) * steps_per_epoch
    expected = straight.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_training_killed_after_an_epoch_resumes_from_it_and_a_third_run_does_nothing(tmp_path):
    last = run_until_checkpoint(TRAIN_ARGS, tmp_path, "cache/methods/*/last.ckpt")
    workdir = last.parent
    done = epochs_done(last)
    assert 1 <= done < EPOCHS and not (workdir / "trained.pth").exists()

    rerun = run_py([*TRAIN_ARGS, "logger=csv"], tmp_path, timeout=300)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert f"resuming tnt training from epoch {done} of {EPOCHS}" in output
    assert epochs_run(output) == list(range(done, EPOCHS))
    (record,) = read_records(tmp_path / "results")
    assert record["status"] == "ok" and record["details"]["resumed_from_epoch"] == done
    trained = torch.load(workdir / "trained.pth", map_location="cpu", weights_only=True)
    assert trained["metrics"]["resumed_from_epoch"] == done and trained["metrics"]["epochs"] == EPOCHS
    assert not (workdir / "last.ckpt").exists()

    third = run_py([*TRAIN_ARGS, "logger=csv"], tmp_path, timeout=300)
    output = third.stdout + third.stderr
    assert third.returncode == 0 and "already recorded" in output, output[-3000:]  # the store skips it
    assert epochs_run(output) == [] and len(read_records(tmp_path / "results", history=True)) == 1

    again = run_py([*TRAIN_ARGS, "logger=csv", "skip_recorded=false"], tmp_path, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and "already trained" in output, output[-3000:]  # the cache serves it
    assert epochs_run(output) == []
    record = read_records(tmp_path / "results")[-1]
    assert record["details"]["trained_now"] is False and record["details"]["resumed_from_epoch"] is None


@pytest.mark.slow
def test_pretraining_killed_after_an_epoch_resumes_from_it_to_the_uninterrupted_weights(tmp_path):
    last = run_until_checkpoint(PRETRAIN_ARGS, tmp_path, "cache/backbones/*.work/last.ckpt")
    done = epochs_done(last)
    assert 1 <= done < EPOCHS and not list((tmp_path / "cache" / "backbones").glob("*.pth"))

    rerun = run_py([*PRETRAIN_ARGS, "logger=csv"], tmp_path, timeout=300)
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-3000:]
    assert f"resuming backbone vit_mnist pretraining from epoch {done} of {EPOCHS}" in output
    assert epochs_run(output) == list(range(done, EPOCHS))
    (record,) = read_records(tmp_path / "results")
    assert record["status"] == "ok" and record["details"]["resumed_from_epoch"] == done
    assert not last.parent.exists()  # the work folder goes once the weights are cached

    # The resumed weights are the ones an uninterrupted pretraining gives, bit for bit.
    cfg = compose_config([*PRETRAIN_ARGS[1:]], tmp_path / "straight")
    spec = instantiate(cfg.model)
    cached = torch.load(pretrained_path(spec, tmp_path / "cache"), map_location="cpu", weights_only=True)
    model = create_model(spec)
    pretrain_fn(cfg)(model, spec)
    straight = model.state_dict()
    assert all(torch.equal(straight[k], cached["model"][k]) for k in straight)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated zip"])
def test_a_damaged_last_ckpt_is_reported_with_its_path_and_training_restarts(tmp_path, caplog, content):
    (tmp_path / "last.ckpt").write_bytes(content)
    checkpoints = LastCheckpoint(tmp_path)
    assert checkpoints.resume_point() is None
    assert f"{tmp_path / 'last.ckpt'} is damaged" in caplog.text and "restarts from epoch 0" in caplog.text
    assert not (tmp_path / "last.ckpt").exists()


def test_a_write_killed_midway_leaves_the_previous_last_ckpt_in_use(tmp_path):
    torch.save({"resume": {"epochs_done": 2, "global_step": 8}}, tmp_path / "last.ckpt")
    (tmp_path / ".last.ckpt.partial").write_bytes(b"PK\x03\x04half of epoch 3")
    assert LastCheckpoint(tmp_path).resume_point() == {"epochs_done": 2, "global_step": 8}
    assert not (tmp_path / ".last.ckpt.partial").exists()


def test_a_recipe_of_a_fraction_of_an_epoch_trains_that_fraction_of_the_batches(tmp_path, monkeypatch):
    """``epochs: 0.5`` (the embedded study's DynamicViT and dTPS) is half of one epoch's steps, also
    under a ``trainer.limit_train_batches`` count; a fraction above 1 is refused before training."""
    args = [a.replace("train_per_class=30", "train_per_class=60") for a in TRAIN_ARGS[1:]]
    args += ["data.train_overrides.batch_size=32", "++data.train_overrides.schedule=step"]
    steps = {}
    budgets = {
        "whole": ["data.train_overrides.epochs=1"],
        "half": ["data.train_overrides.epochs=0.5"],
        "half of 4": ["data.train_overrides.epochs=0.5", "+trainer.limit_train_batches=4"],
    }
    for name, extra in budgets.items():
        cfg = compose_config([*args, *extra], tmp_path)
        counter = StepCounter()
        add_callback(monkeypatch, train, counter)
        _, metrics = train.fit(cfg, instantiate(cfg.model), tmp_path / name, False)
        steps[name] = counter.steps
    assert steps["whole"] >= 4
    assert steps["half"] == steps["whole"] // 2
    assert steps["half of 4"] == 2
    assert metrics["epochs"] == 0.5
    cfg = compose_config([*args, "data.train_overrides.epochs=1.5"], tmp_path)
    with pytest.raises(
        ConfigError, match=r"method.train.epochs=1.5 is not allowed: an integer >= 1, or a fraction"
    ):
        train.fit(cfg, instantiate(cfg.model), tmp_path / "bad", False)
