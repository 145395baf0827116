"""Every bad input fails early: a user error naming the key or file, and nothing expensive (a
backbone's training, a model's weights, a record) done before it.

Every case goes through what run.py does (compose, the ``+key`` check, :func:`run_task`) in this
process; one case of each kind also goes through run.py itself, to see the exit status 2 and the
one ``error:`` line without a traceback (a process start costs seconds; 43 of them would cost
minutes)."""

from __future__ import annotations

import time

import pytest

from helpers import CONF, HAS_CUDA, compose_config, run_py
from tnt_lightning.config import check_added_keys, check_environment, validate
from tnt_lightning.errors import UserError
from tnt_lightning.tasks import run_task

# (overrides, what the message must name). "{tmp}" is the test's root folder.
BAD_INPUTS = [
    (["keep_rate=1.5"], "keep_rate=1.5"),
    (["keep_rate=0"], "keep_rate=0"),
    (["seed=-1"], "seed=-1"),
    (["+keep_rat=0.3"], "did you mean keep_rate"),
    (["+foo=1"], "+foo"),
    (["+model.foo=1"], "+model.foo"),
    (["+data.bach_size=4"], "did you mean data.batch_size"),
    (["+trainer.limit_train_batchez=4"], "+trainer.limit_train_batchez"),
    (["trainer.max_epochs=-1"], "trainer.max_epochs=-1"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.precision=bogus"], "trainer.precision='bogus'"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.devices=abc"], "trainer.devices='abc'"),
    (["trainer.accelerator=quantum"], "trainer.accelerator='quantum'"),
    (["measure.device=tpu"], "measure.device='tpu'"),
    (["measure.iters=0"], "measure.iters=0"),
    (["measure.batch_size=-1"], "measure.batch_size=-1"),
    (["measure.throughput_mode=fast"], "measure.throughput_mode='fast'"),
    (["measure.dtype=fp8"], "measure.dtype='fp8'"),
    (["measure.compile=maybe"], "measure.compile='maybe'"),
    (["measure.speedup_pairs=-1"], "measure.speedup_pairs=-1"),
    (["data.split_seed=-1"], "data.split_seed=-1"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.eval_batch_size=-2"], "data.eval_batch_size=-2"),
    (["data.num_workers=-1"], "data.num_workers=-1"),
    (["method=topk", "schedule=multi", "schedule.rates=[0.5,1.5]"], "schedule.rates=[0.5, 1.5]"),
    (["method=topk", "schedule.rates=[0.5]"], "only with schedule=multi"),
    (["method=topk", "schedule=multi", "schedule.blocks=[3,2]"], "schedule.blocks=[3, 2]"),
    (["method=topk", "schedule=multi", "schedule.blocks=[1,9]"], "model.arch.depth=6"),
    (
        ["method=topk", "schedule=multi", "schedule.blocks=[1,2]", "schedule.rates=[0.5]"],
        "one rate per block",
    ),
    (["method=topk", "schedule.blocks=[1,2]"], "one block with schedule=single"),
    (["method=tnt", "method.train.epochs=0"], "method.train.epochs=0"),
    (["method=tnt", "method.train.base_lr=-1"], "method.train.base_lr=-1"),
    (["paths.results_dir={tmp}/a_file"], "paths.results_dir="),
    (["paths.results_dir=/proc/tnt-results"], "paths.results_dir='/proc/tnt-results'"),
    (["logger=wandb", "logger.wandb.mode=online"], "logger.wandb.mode='online'"),
    (["data=imagefolder", "data.root={tmp}", "data.preprocess.crop_pct=0"], "data.preprocess.crop_pct=0"),
    (["task=visualize", "method=topk", "visualize.num_images=0"], "visualize.num_images=0"),
    # the method refuses the schedule: found by building it on the backbone before the run starts
    (["method=tome", "keep_rate=0.3"], "Use keep_rate >= 0.5"),
    (["method=tome", "schedule=multi"], "set e.g. method.r=8"),
]


# Refused only where there is no GPU to give (test_gpu_settings_are_accepted_on_a_gpu_machine).
GPU_SETTINGS = [
    (["trainer.accelerator=gpu"], "trainer.accelerator='gpu'"),
    (["measure.device=cuda"], "measure.device='cuda'"),
]


if not HAS_CUDA:
    BAD_INPUTS += GPU_SETTINGS


# Errors found when the run opens its files, before any weights load, any training or any data is
# read: recorded as a failed run of that configuration.
FAILS_AT_BUILD = [
    (["model.checkpoint={tmp}/a_file"], "model.checkpoint="),
    (["model.checkpoint={tmp}/missing.pth"], "model.checkpoint="),
    (["method=tnt", "method.checkpoint={tmp}/a_file"], "method.checkpoint="),
    (["method=tnt", "method.checkpoint={tmp}/missing.pth"], "method.checkpoint="),
]


CASES = [(*case, False) for case in BAD_INPUTS] + [(*case, True) for case in FAILS_AT_BUILD]


THROUGH_RUN_PY = [
    (["keep_rate=1.5"], "keep_rate=1.5", False),
    (["+keep_rat=0.3"], "did you mean keep_rate", False),
    (["trainer.devices=abc"], "trainer.devices='abc'", False),
    (["paths.results_dir=/proc/tnt-results"], "paths.results_dir='/proc/tnt-results'", False),
    (["method=tome", "keep_rate=0.3"], "Use keep_rate >= 0.5", False),
]


def no_expensive_work_done(root, output: str, recorded: bool) -> None:
    assert not (root / "cache").exists() and "training backbone" not in output
    assert (root / "results" / "results.jsonl").exists() == recorded


@pytest.mark.parametrize("overrides,named,recorded", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_fails_early_naming_itself(overrides, named, recorded, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("WANDB_API_KEY", "")
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    start = time.time()
    with pytest.raises(UserError) as failure:
        cfg = compose_config(args, tmp_path)
        check_added_keys(args, cfg, str(CONF))
        run_task(cfg)
    assert named in str(failure.value), str(failure.value)
    assert "\n" not in str(failure.value), "one line"
    no_expensive_work_done(tmp_path, capsys.readouterr().out, recorded)
    assert time.time() - start < 30


@pytest.mark.parametrize(
    "overrides,named,recorded", THROUGH_RUN_PY, ids=[" ".join(c[0]) for c in THROUGH_RUN_PY]
)
def test_run_py_prints_one_error_line_and_exits_2(overrides, named, recorded, tmp_path):
    proc = run_py(overrides, tmp_path, timeout=120, env={"HYDRA_FULL_ERROR": "", "WANDB_API_KEY": ""})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and named in last, last
    assert "Traceback" not in proc.stderr
    no_expensive_work_done(tmp_path, output, recorded)


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [o for o, _ in GPU_SETTINGS], ids=[o[0] for o, _ in GPU_SETTINGS])
def test_gpu_settings_are_accepted_on_a_gpu_machine(overrides, tmp_path):
    cfg = compose_config(overrides, tmp_path)
    check_added_keys(overrides, cfg, str(CONF))
    validate(cfg)
    check_environment(cfg)  # where a machine without CUDA refuses them (BAD_INPUTS)


def test_pretraining_vit_mnist_on_other_data_is_refused(tmp_path):
    proc = run_py(["task=pretrain", "data=imagefolder", f"data.root={tmp_path}"], tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "model=vit_mnist is pretrained on its own data (MNISTDataModule" in proc.stderr + proc.stdout
    assert not (tmp_path / "cache").exists()
