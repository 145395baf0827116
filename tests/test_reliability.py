"""Stopped jobs, concurrent sweeps, loggers that fail: nothing runs twice, nothing is lost."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, run_py
from tnt_lightning.results import read_records
from tnt_lightning.tasks.common import close_logger
from tnt_lightning.tasks.interrupts import JobInterrupted, outcome

COST_ONLY = ["data=synthetic", "measure.throughput=false", "logger=csv"]


def _popen(args: list[str], root) -> subprocess.Popen:
    env = {**os.environ, "TNT_ROOT": str(root), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 240) -> str:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{marker!r} never appeared:\n{''.join(seen)[-3000:]}")


def test_sigterm_ends_the_sweep_with_status_143_and_an_interrupted_record(tmp_path):
    """A scheduler's SIGTERM mid-training: the job is recorded as interrupted (not failed, not ok),
    its claim is released, the jobs after it do not start, and the process does not exit 0."""
    proc = _popen(["-m", "seed=0,1", "logger=csv"], tmp_path)
    _wait_for(proc, "training backbone vit_mnist once")
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, rest[-3000:]
    (record,) = read_records(tmp_path / "results", history=True)  # the second job never started
    assert record["status"] == "interrupted" and record["error"]["message"] == "stopped by SIGTERM"
    assert record["seed"] == 0 and not list((tmp_path / "results" / "claims").glob("*.json"))


def test_two_sweeps_on_one_root_run_each_experiment_once(tmp_path):
    first = _popen(["-m", "method=random,topk,evit", "keep_rate=0.5,0.7", *COST_ONLY], tmp_path)
    second = _popen(["-m", "method=evit,topk,zerotp", "keep_rate=0.7,0.5", *COST_ONLY], tmp_path)
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    history = read_records(tmp_path / "results", history=True)
    ran = sorted((r["method"], r["keep_rate"]) for r in history)
    assert ran == sorted({(m, k) for m in ("random", "topk", "evit", "zerotp") for k in (0.5, 0.7)})
    said = [line for o in outputs for line in o.splitlines()]  # run_task's own line per job
    shared = sum(line.startswith(("eval: already recorded", "eval: running already")) for line in said)
    assert shared == 4  # topk and evit at both rates: done by one sweep, skipped by the other

    again = run_py(["-m", "method=random,topk", "keep_rate=0.5", *COST_ONLY], tmp_path, timeout=300)
    assert again.returncode == 0 and again.stdout.count("eval: already recorded") == 2
    assert len(read_records(tmp_path / "results", history=True)) == len(history)


def test_a_logger_that_cannot_start_still_leaves_a_failed_record(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    proc = run_py(["logger=csv", f"logger.csv.save_dir={blocker}", *COST_ONLY[:2]], tmp_path, timeout=300)
    assert proc.returncode != 0
    (record,) = read_records(tmp_path / "results")
    assert record["status"] == "failed" and "not_a_folder" in record["error"]["message"]


def test_a_logger_that_fails_to_close_does_not_fail_the_run(caplog):
    class DeadService:
        save_dir = "/somewhere/wandb"

        def finalize(self, status):
            raise ConnectionResetError("wandb-core is gone")

    with caplog.at_level(logging.WARNING):
        close_logger(DeadService())
    assert "did not close cleanly" in caplog.text and "/somewhere/wandb" in caplog.text


def _raise_from(filename: str, exc: BaseException):
    try:
        exec(compile("raise exc", filename, "exec"), {"exc": exc})
    except BaseException as e:
        return e, e.__traceback__


@pytest.mark.parametrize(
    "exc,filename,expected",
    [
        (JobInterrupted(signal.SIGTERM), "task.py", ("interrupted", 143)),
        (JobInterrupted(signal.SIGINT), "task.py", ("interrupted", 130)),
        (KeyboardInterrupt(), "task.py", ("interrupted", 130)),
        (SystemExit(-1), "/site-packages/submitit/core/job_environment.py", ("preempted", None)),
        (SystemExit(-1), "task.py", ("interrupted", None)),
        (ValueError("bad"), "task.py", ("failed", None)),
    ],
)
def test_how_an_attempt_ended_decides_its_status_and_exit_code(exc, filename, expected):
    raised, tb = _raise_from(filename, exc)
    assert outcome(raised, tb) == expected


def test_lightnings_sigterm_exception_is_an_interruption_not_a_clean_exit():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    raised, tb = _raise_from("loop.py", SIGTERMException())
    assert outcome(raised, tb) == ("interrupted", 143)
    assert outcome(None, None) == ("ok", None)


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


TWO_SIGTERMS = """
import sys, time
from omegaconf import OmegaConf
from tnt_lightning.tasks import records
from tnt_lightning.tasks.interrupts import JobInterrupted, interruption_signals

records.process_rank = lambda: 0


def slow_environment(device=None):  # stands for the imports and git calls of a real record
    print("building the record", flush=True)
    time.sleep(1.0)
    return {}


records.environment = slow_environment
cfg = OmegaConf.create({
    "task": "eval", "paths": {"results_dir": sys.argv[1]}, "model": {"name": "vit"},
    "method": {"name": "topk"}, "keep_rate": 0.5, "schedule": {"name": "constant"},
    "data": {"name": "synthetic"}, "seed": 0, "sweep_name": None,
})
try:
    with interruption_signals(), records.RunRecorder(cfg):
        print("running", flush=True)
        time.sleep(60)
except JobInterrupted as e:
    sys.exit(e.exit_code)
"""


def test_a_second_sigterm_while_the_record_is_built_does_not_lose_it(tmp_path):
    """Signals are held for the whole record write (built, then appended), not only the append."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TWO_SIGTERMS, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "building the record"
    time.sleep(0.07)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    (record,) = read_records(tmp_path, history=True)
    assert record["status"] == "interrupted" and record["error"]["message"] == "stopped by SIGTERM"
