"""DDP under Lightning's own launch (``trainer=ddp``, 2 CPU processes over gloo): the ranks train
each artefact once, together, and the job records once; a rank 0 that dies makes every rank stop."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, compose_config, run_py

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv"]


# 30 digits per class, one epoch of the method (no warm-up) and of the backbone, validation on one batch
SMALL = [
    "data.train_overrides.epochs=1",
    "data.train_overrides.warmup_epochs=0",
    "+data.train_per_class=30",
    "data.eval_batch_size=100",
    "+trainer.limit_val_batches=1",
    "model.pretrain.epochs=1",
    "+model.pretrain.data.train_per_class=20",
]


ENV = {"OMP_NUM_THREADS": "1"}


def _records(root: Path) -> list[dict]:
    path = root / "results" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_ddp_artefact_identity_counts_its_processes_and_one_process_keeps_the_old_one(tmp_path):
    from hydra.utils import instantiate

    from tnt_lightning.engine import backbone_info
    from tnt_lightning.methods import build_reducer
    from tnt_lightning.models import create_model
    from tnt_lightning.models.trained import training_dir, training_identity

    def identity(*overrides):
        cfg = compose_config(["task=train", "method=tnt", *overrides], tmp_path)
        spec = instantiate(cfg.model)
        info = backbone_info(create_model(spec))
        reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, info)
        reducer.bind(info)
        return training_identity(cfg, spec, reducer), training_dir(cfg, spec, reducer)

    one, one_dir = identity()
    two, two_dir = identity(*DDP)
    assert "world_size" not in one and two["world_size"] == 2
    assert two["backbone"]["pretrain"] != one["backbone"]["pretrain"]  # pretrained by 2 processes
    assert one_dir != two_dir
    # the one-process identity is the one of before (this commit's parent wrote these folders)
    assert one_dir.name == "tnt-vit_mnist-" + one_dir.name.rsplit("-", 1)[1]
    assert one["backbone"] == {"name": "vit_mnist", "pretrain": one["backbone"]["pretrain"]}


@pytest.mark.slow
def test_ddp_training_on_a_fresh_root_pretrains_and_trains_once_and_records_once(tmp_path):
    """The backbone's pretraining and the method's training, both under Lightning's launch: each
    artefact once (rank 0 saves), one record, no claim and no decision file left."""
    proc = run_py(["task=train", "method=tnt", *DDP, *SMALL], tmp_path, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(tmp_path)
    assert [(r["task"], r["status"]) for r in records] == [("train", "ok")]
    assert records[0]["metrics"]["acc1"] is not None
    assert records[0]["config"]["trainer"]["devices"] == 2
    cache = tmp_path / "cache"
    assert len(list((cache / "backbones").glob("*.pth"))) == 1
    assert len(list((cache / "methods").glob("*/trained.pth"))) == 1
    assert not list(cache.rglob(".decision-*"))
    assert not list((tmp_path / "results" / "claims").iterdir())
    # the same job once more finds both artefacts cached: the ranks follow rank 0 to the cache
    again = run_py(["task=train", "method=tnt", "skip_recorded=false", *DDP, *SMALL], tmp_path, 300, ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["details"]["trained_now"] for r in _records(tmp_path)] == [True, False]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_killing_rank_0_at_its_decision_stops_every_rank_naming_the_cause(tmp_path):
    """kill -9 of rank 0 the moment its decision file appears: rank 1 (started by it) exits with a
    non-zero status within seconds, saying that rank 0 exited."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)  # rank 1, orphaned, becomes ours: we read its status
    env = {**os.environ, "TNT_ROOT": str(tmp_path), "WANDB_MODE": "disabled", **ENV}
    args = [f"paths.root_dir={tmp_path}", "task=train", "method=tnt", *DDP, *SMALL]
    rank0 = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "cache").rglob(".decision-*")):
            assert rank0.poll() is None and time.time() < deadline, "rank 0 never decided"
            time.sleep(0.05)
        others = _children(rank0.pid)
        assert len(others) == 1, "rank 0 starts rank 1 before it decides"
        rank0.send_signal(signal.SIGKILL)
        killed = time.time()
        rank0.wait()
        _, status = os.waitpid(others[0], 0)
        took = time.time() - killed
        stderr = rank0.stderr.read()  # every rank wrote to this pipe
    finally:
        for pid in [*_children(rank0.pid), rank0.pid]:  # a job that hangs is not left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
    assert os.waitstatus_to_exitcode(status) != 0
    assert took < 60, f"rank 1 ran {took:.0f} s after rank 0 was killed"
    assert f"rank 1: rank 0 (pid {rank0.pid}" in stderr and "exited" in stderr, stderr[-3000:]
    print(f"rank 1 exited {took:.1f} s after rank 0 was killed, status {status}: {stderr.strip()[-300:]}")


def _rank(rank: int, setup, queue) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from tnt_lightning.models.trained import Trained, ensure_trained

    cfg, spec, reducer = setup
    rank_zero_only.rank = rank
    fits = []
    state = {n: p.detach() for n, p in reducer.trainable_parameters()}
    train = lambda workdir: fits.append(rank) or Trained(state, None, {"val_acc1": 1.0, "val_acc1_full": 2.0})  # noqa: E731
    path, trained = ensure_trained(cfg, spec, reducer, train)
    queue.put((rank, trained, len(fits)))


def test_the_ranks_of_one_ddp_job_train_a_shared_artefact_once_together(tmp_path, monkeypatch):
    """Rank 0 takes the artefact's lock and decides; rank 1 follows: both train (one DDP run) when
    nothing is cached, neither when it is, and the file is written once."""
    from hydra.utils import instantiate

    from helpers import compose_config
    from tnt_lightning.engine import backbone_info
    from tnt_lightning.methods import build_reducer
    from tnt_lightning.models import create_model

    cfg = compose_config(["method=tnt"], tmp_path)
    spec = instantiate(cfg.model)
    reducer, _ = build_reducer(
        cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, backbone_info(create_model(spec))
    )
    reducer.bind(backbone_info(create_model(spec)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TNT_JOB_TOKEN", "job-a")
    ctx = multiprocessing.get_context("fork")
    for expected in ((True, 1), (False, 0)):  # first nothing cached, then the artefact is
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, (cfg, spec, reducer), queue)) for r in (1, 0)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert sorted(queue.get(timeout=5) for _ in procs) == [(0, *expected), (1, *expected)]
    workdir = next(p for p in (tmp_path / "cache" / "methods").glob("tnt-*") if p.is_dir())
    assert (workdir / "trained.pth").is_file() and not list(workdir.glob(".decision-*"))
