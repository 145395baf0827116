"""The SLURM launcher without a cluster: submissions, checks, requeue counting, SIGTERM handling.

The same path against a real slurmctld is tests/results/test_slurm_real.py (``make test-slurm``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT
from hydra_plugins.tnt_lightning_slurm import (
    TntSlurmLauncher,
    effective_signal_delay,
    submission_errors,
    submitit_timed_out,
)
from tnt_lightning.results import slurm, watch

GOOD = {
    "nodes": 1,
    "tasks_per_node": 1,
    "cpus_per_task": 2,
    "timeout_min": 10,
    "gpus_per_node": 0,
    "mem_gb": 4,
    "max_num_timeout": 3,
    "max_num_preempt": 10,
    "signal_delay_max_fraction": 0.2,
}


def make_dry(*variables: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "slurm-dry", f"PYTHON={sys.executable}", *variables],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_signal_delay_is_clamped_to_a_fraction_of_the_time_limit():
    assert effective_signal_delay(120, 240, 0.2) == 120
    assert effective_signal_delay(120, 2, 0.2) == 24  # not USR2 at once on a 2-minute job
    assert effective_signal_delay(120, 0, 0.2) == 1


def test_timed_out_follows_submitits_rule():
    assert not submitit_timed_out(100 * 60, 240)  # a USR2 long before the end: preemption
    assert submitit_timed_out(238 * 60, 240)
    assert submitit_timed_out(5, 3)  # under 10 minutes every USR2 is a time-out


@pytest.mark.parametrize(
    "change,trainer,message",
    [
        ({"tasks_per_node": 0}, None, "hydra.launcher.tasks_per_node=0: must be an integer >= 1"),
        ({"cpus_per_task": 0}, None, "hydra.launcher.cpus_per_task=0"),
        ({"gpus_per_node": -1}, None, "gpus_per_node=-1"),
        ({"mem_gb": 0}, None, "mem_gb=0"),
        ({"max_num_timeout": -1}, None, "max_num_timeout=-1"),
        ({}, {"accelerator": "gpu", "devices": 1}, "use trainer=cpu"),
        ({"gpus_per_node": 4, "tasks_per_node": 4}, {"accelerator": "gpu", "devices": 2}, "must be equal"),
    ],
)
def test_what_sbatch_or_the_job_would_refuse_is_refused(change, trainer, message):
    errors = submission_errors({**GOOD, **change}, trainer)
    assert len(errors) == 1 and message in errors[0], errors


def test_a_good_cpu_submission_passes():
    assert submission_errors(GOOD, {"accelerator": "cpu", "devices": 1}) == []


def test_cpu_submission_from_make_is_what_a_small_node_takes(tmp_path):
    proc = make_dry(
        "GPUS=0", "CPUS=2", "MEM_GB=4", "TIME_MIN=2", "ARGS=method=none,topk", env={"TNT_ROOT": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in (
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=0",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=4GB",
        "#SBATCH --time=2",
        "#SBATCH --signal=USR2@24",
    ):
        assert line in proc.stdout
    assert "requeued up to 3 time(s) after a time-out" in proc.stdout
    assert proc.stdout.count("trainer=cpu") == 2


def test_ddp_splits_the_node_cpus_over_its_tasks_and_partition_comes_from_the_environment(tmp_path):
    proc = make_dry("GPUS=4", "CPUS=16", env={"TNT_ROOT": str(tmp_path), "SLURM_PARTITION": "envpart"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "#SBATCH --partition=envpart" in proc.stdout
    assert "#SBATCH --ntasks-per-node=4" in proc.stdout and "#SBATCH --cpus-per-task=4" in proc.stdout
    assert "trainer=ddp trainer.devices=4" in proc.stdout


@pytest.mark.parametrize(
    "variables,message",
    [
        (["GPUS="], "GPUS='': must be a whole number"),
        (["GPUS=4", "CPUS=2"], "CPUS=2 is fewer than the 4 tasks"),
        (["GPUS=0", "ARGS=trainer=gpu"], "use trainer=cpu"),
    ],
)
def test_make_refuses_bad_submissions_with_the_reason(tmp_path, variables, message):
    proc = make_dry(*variables, env={"TNT_ROOT": str(tmp_path)})
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert "#SBATCH" not in proc.stdout


def launcher(**params) -> TntSlurmLauncher:
    launcher = TntSlurmLauncher(**{**GOOD, "signal_delay_s": 120, "submitit_folder": "x", **params})
    launcher.check()
    return launcher


def test_checkpoint_requeues_time_outs_up_to_max_num_timeout():
    job = launcher(timeout_min=3, max_num_timeout=1)
    assert job.params["signal_delay_s"] == 36
    assert job.checkpoint("args") is not None and slurm.interruption()["requeued"]
    assert job.timeouts == 1
    assert job.checkpoint("args") is None  # submitit then raises UncompletedJobError
    assert not slurm.interruption()["requeued"] and slurm.interruption_status() == "interrupted"


def test_checkpoint_requeues_preemptions_up_to_max_num_preempt():
    job = launcher(timeout_min=240, max_num_preempt=1)
    job._started_at = time.time()  # a USR2 at once: a preemption, not the time limit
    assert job.checkpoint("args") is not None and slurm.interruption_status() == "preempted"
    assert job.checkpoint("args") is None and job.preemptions == 1


@pytest.mark.parametrize(
    "job,raised,status",
    [
        ({"Restarts": "1", "Reason": "None"}, slurm.SlurmRequeued, "preempted"),
        ({"Restarts": "0", "Reason": "TimeLimit"}, slurm.SlurmCancelled, "interrupted"),
        ({"Restarts": "0", "Reason": "None"}, slurm.SlurmCancelled, "interrupted"),
    ],
)
def test_sigterm_becomes_an_exception_that_says_whether_the_job_was_requeued(
    monkeypatch, job, raised, status
):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setattr(slurm, "slurmctld_job", lambda: job)
    monkeypatch.setattr(slurm, "_interruption", None)
    seen = []
    previous = signal.getsignal(signal.SIGTERM)
    try:
        slurm.watch_sigterm(lambda signum, frame: seen.append(signum))
        with pytest.raises(raised):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert seen == [signal.SIGTERM]  # submitit's handler still runs
        assert slurm.interruption_status() == status
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM while unwinding raises nothing
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_job_info_names_the_array_task(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    info = slurm.job_info()
    assert info["job_id"] == "10_2" and info["array_task_id"] == 2 and info["restart_count"] == 1


def test_watch_counts_the_sweeps_records_and_jobs(tmp_path, monkeypatch, capsys):
    from tnt_lightning.results import append_record

    sweep = tmp_path / "outputs" / "multiruns" / "2026-01-01_00-00-00"
    for job in ("5_0", "5_1", "5_2"):
        (sweep / ".submitit" / job).mkdir(parents=True)
    for i, (job, status) in enumerate((("5_0", "ok"), ("5_1", "preempted"), ("5_1", "ok"), ("9_0", "ok"))):
        record = {"run_id": f"r{i}", "task": "eval", "status": status, "slurm": {"job_id": job}}
        append_record(tmp_path / "results", record)
    monkeypatch.setattr(
        watch, "sacct_states", lambda ids: {"5_0": "COMPLETED", "5_1": "COMPLETED", "5_2": "RUNNING"}
    )
    code = watch.main(["--log-dir", str(tmp_path / "outputs"), "--results-dir", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 job(s); SLURM: completed 2, running 1; records: ok 2, preempted 1" in out
