"""Sweeps (``sweeps/``, ``+sweep=<name>``): they hold the paper's settings, resume without redoing
recorded jobs, record failures without stopping, and launch through submitit and SLURM; a SIGTERM
ends a sweep with 143, two sweeps on one root run each experiment once; the demo's sweep has no job
known to fail."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers import CONF, COST_ONLY, ROOT, run_py
from tnt_lightning.paper import load_results
from tnt_lightning.results import read_records
from tnt_lightning.tasks.common import wandb_run_fields

SWEEPS = sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml"))


def sweep_config(name: str, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config", overrides=[f"+sweep={name}", *overrides], return_hydra_config=True
        )


def sweep_values(text: str) -> list[str]:
    """The values of one sweep parameter: "a,b" or "[1,2],[3,4]"."""
    return re.findall(r"\[[^\]]*\]|[^,\[\]]+", str(text))


def rates(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in re.findall(r"\d*\.\d+|\d+", text))


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_composes_names_itself_and_resumes(name):
    cfg = sweep_config(name)
    assert cfg.sweep_name == name and cfg.skip_recorded is True
    assert cfg.hydra.sweeper.params, "a sweep must sweep something"


@pytest.mark.parametrize(
    ("method", "key"),
    [
        ("tnt", "schedule.rates"),
        ("topk", "schedule.rates"),
        ("zerotp", "schedule.rates"),
        ("tome", "method.r"),
    ],
)
def test_multi_layer_sweeps_hold_every_rate_row_of_the_paper(method, key):
    cfg = sweep_config(f"paper_multi_{method}")
    assert cfg.schedule.name == "multi" and cfg.method.name == method
    swept = {rates(v) for v in sweep_values(cfg.hydra.sweeper.params[key])}
    paper = {
        rates(r["params"].split("=", 1)[1])
        for r in load_results()
        if r["method"] == method and r["schedule"] == "multi" and r["params"]
    }
    assert swept == paper


@pytest.mark.parametrize(
    ("sweeps", "model"),
    [
        (("paper_single_deit_s", "paper_single_tome"), "deit_small_distilled"),
        (("paper_single_deit_b", "paper_single_tome"), "deit_base_distilled"),
        (("paper_single_deit_t", "paper_single_tome"), "deit_tiny_distilled"),
        (("paper_single_vit16", "paper_single_vit16_tome"), "vit_b16_meanpool"),
    ],
)
def test_single_layer_sweeps_cover_every_setting_of_their_tables(sweeps, model):
    """Every (method, kept tokens) row of the paper is a job of one of the model's sweeps."""
    jobs = set()
    for sweep in sweeps:
        params = sweep_config(sweep).hydra.sweeper.params
        models = sweep_values(params.model) if "model" in params else [sweep_config(sweep).model.name]
        assert sweep_config(sweep).data.name == "imagenet"
        if model in models:
            jobs |= {
                (m, int(196 * float(k)))
                for m in sweep_values(params.method)
                for k in sweep_values(params.keep_rate)
            }
    for row in load_results():
        if row["base_model"] != model or row["schedule"] != "single" or row["method"] in ("base", "tnt_mlp"):
            continue
        setting = row["setting"]
        tokens = (
            int(setting.split("=")[1]) if setting.startswith("#tokens") else int(196 * float(setting[2:]))
        )
        assert (row["method"], tokens) in jobs, row


def test_command_line_overrides_beat_the_sweep(tmp_path):
    cfg = sweep_config("paper_single_deit_s", "data=synthetic", "paper_flops_compat=false")
    assert cfg.data.name == "synthetic" and cfg.paper_flops_compat is False


def test_a_sweep_resumes_and_records_failures_without_stopping(tmp_path):
    args = [
        "-m",
        "+sweep=mnist_all",
        "method=random,tome",
        "keep_rate=0.7,0.3",
        "data=synthetic",
        "measure.throughput=false",
        "logger=csv",
    ]
    first = run_py(args, tmp_path, timeout=300)
    assert first.returncode == 1  # after running every job and printing the table
    jobs = re.findall(r"^job (\d) of 4: (.*)$", first.stdout, re.M)
    assert [j for _, j in jobs] == [
        "method=random keep_rate=0.7",
        "method=random keep_rate=0.3",
        "method=tome keep_rate=0.7",
        "method=tome keep_rate=0.3",
    ]
    table = first.stdout.split("sweep done, ", 1)[1].splitlines()
    assert table[0] == "4 of 4 job(s): 3 recorded, 0 skipped, 1 failed"
    assert re.match(r" +1 +method=random keep_rate=0.7 +recorded: run \w{12}", table[2]), table
    assert re.match(
        r" +4 +method=tome keep_rate=0.3 +failed: ReductionError: method=tome merges at most half", table[5]
    )
    assert "Error executing job" not in first.stderr  # one table, not Hydra's traceback
    records = read_records(tmp_path / "results")
    status = {(r["method"], r["keep_rate"]): r["status"] for r in records}
    # ToMe keeps at least half the tokens in one layer: a config error, found before its run
    # starts, so it leaves no record (a failure during a run is recorded: tests/test_run.py)
    assert status == {("random", 0.7): "ok", ("random", 0.3): "ok", ("tome", 0.7): "ok"}
    assert "merges at most half" in first.stderr

    again = run_py(args, tmp_path, timeout=300)
    assert again.stdout.count("eval: already recorded") == 3  # only the failed job runs again
    assert again.returncode != 0 and "merges at most half" in again.stderr
    assert "sweep done, 4 of 4 job(s): 0 recorded, 3 skipped, 1 failed" in again.stdout
    assert re.search(r" 2 +method=random keep_rate=0.3 +skipped: already recorded as run", again.stdout)
    assert len(read_records(tmp_path / "results", history=True)) == 3  # one record per experiment


def test_the_sweep_report_tells_recorded_skipped_and_failed_jobs(tmp_path, capsys, monkeypatch):
    """The callback on its own, as a launcher drives it: every kind of end, then one table."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    from hydra.core.utils import JobReturn, JobStatus
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from tnt_lightning.errors import ConfigError
    from tnt_lightning.tasks.sweep_report import SweepReport

    report = SweepReport()
    report.total, report.common = 4, ["data=synthetic"]
    ends = [
        (JobStatus.COMPLETED, {"run_id": "a" * 12, "created_at": "2999-01-01T00:00:00+00:00", "metrics": {}}),
        (JobStatus.COMPLETED, {"run_id": "b" * 12, "created_at": "2020-01-01T00:00:00+00:00"}),
        (JobStatus.COMPLETED, None),  # run_task: another job holds the claim
        (JobStatus.FAILED, ConfigError("keep_rate=2 is not allowed\nsecond line")),
    ]
    returns = []
    for num, (status, value) in enumerate(ends):
        job = OmegaConf.create(
            {
                "hydra": {
                    "mode": RunMode.MULTIRUN,
                    "job": {"num": num},
                    "overrides": {"task": [f"keep_rate=0.{num}", "data=synthetic"]},
                    "runtime": {"output_dir": str(tmp_path / str(num))},
                }
            }
        )
        (tmp_path / str(num)).mkdir()
        report.on_job_start(config=job)
        returns.append(JobReturn(status=status, _return_value=value))
        report.on_job_end(config=job, job_return=returns[-1])
    assert all(r.status is JobStatus.COMPLETED for r in returns)  # the sweep goes on to the table
    with pytest.raises(SystemExit) as end:
        report.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert end.value.code == 1
    out = capsys.readouterr()
    assert "job 1 of 4: keep_rate=0.0\n" in out.out and "job 4 of 4 failed:\nerror: keep_rate=2" in out.err
    table = out.out.split("sweep done, ", 1)[1].splitlines()
    assert table == [
        "4 of 4 job(s): 1 recorded, 2 skipped, 1 failed",
        "  job  overrides      outcome",
        "    1  keep_rate=0.0  recorded: run aaaaaaaaaaaa",
        "    2  keep_rate=0.1  skipped: already recorded as run bbbbbbbbbbbb (2020-01-01T00:00:00+00:00)",
        "    3  keep_rate=0.2  skipped: running elsewhere (run_task's claim)",
        "    4  keep_rate=0.3  failed: ConfigError: keep_rate=2 is not allowed",
    ]
    # a launcher running jobs in other processes (submitit, SLURM): read back from the job folders
    elsewhere = SweepReport()
    with pytest.raises(SystemExit):
        elsewhere.on_multirun_end(config=OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert capsys.readouterr().out.split("sweep done, ", 1)[1].splitlines()[2:] == table[2:]


def test_a_key_override_on_a_swept_group_reaches_every_job(tmp_path):
    """Hydra sets it on the sweep's first config, composed at the default method=none, which lacks
    it; every swept method has it, so every job gets it."""
    args = ["-m", "method=topk,random", "method.single_block=3", "data=synthetic", "measure.throughput=false"]
    proc = run_py([*args, "logger=csv"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_records(tmp_path / "results")
    assert {
        r["method"]: (r["config"]["method"]["single_block"], r["schedule"]["blocks"]) for r in records
    } == {
        "topk": (3, [3]),
        "random": (3, [3]),
    }


def test_a_key_some_swept_methods_lack_stops_the_sweep_before_any_job(tmp_path):
    args = ["-m", "method=tome,topk", "method.r=8", "schedule=multi", "data=synthetic"]
    proc = run_py(args, tmp_path, timeout=120, env={"HYDRA_FULL_ERROR": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: method.r=8: method.r is a key of method=tome but not of method=topk"), line
    assert "nothing was run" in line and "++method.r=8" in line
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "results").exists()


def test_slurm_dry_run_prints_the_array_submission(tmp_path):
    env = {**os.environ, "TNT_ROOT": str(tmp_path), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [
            "make",
            "-s",
            "slurm-dry",
            "SWEEP=paper_multi_tnt",
            "PARTITION=gpu",
            "GPUS=4",
            f"PYTHON={sys.executable}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for line in (
        "#SBATCH --array=0-9%10",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",  # one DDP process per GPU
        "#SBATCH --mem=64GB",
        "#SBATCH --time=240",
    ):
        assert line in out
    assert "srun" in out and "submitit.core._submit" in out
    jobs = re.findall(r"#   job \d+: python run.py (.*)", out)
    assert len(jobs) == 10 and all("trainer=ddp trainer.devices=4" in j for j in jobs)
    assert "schedule.rates=[0.65,0.85,0.7]" in jobs[4]
    assert not (tmp_path / "results").exists()  # nothing ran


def test_the_same_jobs_run_locally_through_submitit(tmp_path):
    proc = run_py(
        [
            "-m",
            "hydra/launcher=local",
            "method=random,topk",
            "data=synthetic",
            "measure.throughput=false",
            "logger=csv",
            "sweep_name=local_test",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = read_records(tmp_path / "results")
    assert sorted(r["method"] for r in records) == ["random", "topk"]
    assert all(r["status"] == "ok" and r["metrics"]["gflops"] > 0 for r in records)
    assert list(Path(tmp_path / "outputs" / "multiruns").rglob("*_submitted.pkl"))  # went through submitit
    # The same experiment launched another way (Hydra's basic launcher, trainer=cpu) has the same
    # config_key, so it is recognised as done.
    again = run_py(
        ["method=random", "data=synthetic", "measure.throughput=false", "logger=csv", "trainer=cpu"],
        tmp_path,
        timeout=300,
    )
    assert again.returncode == 0 and "already recorded" in again.stdout, again.stdout[-2000:]


def test_wandb_runs_are_named_grouped_and_tagged_for_the_dashboard(tmp_path):
    cfg = sweep_config("mnist_all", "method=tnt", "keep_rate=0.3", "tags=[ablation]", "logger=wandb")
    assert cfg.logger.wandb.group == "mnist_all"
    fields = wandb_run_fields(cfg, cfg.logger.wandb)
    assert fields["name"] == "eval-vit_mnist-tnt-K0.3" and fields["job_type"] == "eval"
    assert fields["tags"] == [
        "method:tnt",
        "model:vit_mnist",
        "schedule:single",
        "data:mnist",
        "task:eval",
        "ablation",
    ]
    assert wandb_run_fields(cfg, cfg.logger.csv) == {}


def test_skipped_records_of_another_commit_are_said_in_one_line():
    from tnt_lightning.tasks.sweep_report import Outcome, other_commit_line

    now, old = "a" * 40, "b" * 40
    outcomes = [
        Outcome(0, "keep_rate=0.5", "skipped", "already recorded", recorded_by=old),
        Outcome(1, "keep_rate=0.7", "skipped", "already recorded", recorded_by=now),
        Outcome(2, "keep_rate=0.9", "recorded", "run x", recorded_by=now),
    ]
    line = other_commit_line(outcomes, current=now)
    assert line.startswith("1 skipped job(s) were recorded by another commit (bbbbbbbbbbbb;")
    assert "skip_recorded=false" in line
    assert other_commit_line(outcomes[1:], current=now) is None


def test_demo_sweep_has_no_job_known_to_fail_and_make_demo_ignores_no_failure():
    sweep = (ROOT / "sweeps" / "mnist_all.yaml").read_text()
    (methods,) = re.findall(r"method: (.*)", sweep)
    (rates,) = re.findall(r"keep_rate: (.*)", sweep)
    # single-layer ToMe merges at most half the tokens: K <= 0.5 fails by design on 49 patches
    assert "tome" not in methods.split(",") or min(float(k) for k in rates.split(",")) > 0.5
    demo = ROOT.joinpath("Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert not re.search(r"^\t-", demo, re.M), "a `-` recipe line hides a failing demo step"


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
