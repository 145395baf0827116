"""The SLURM path against a real single-node slurmctld (``make test-slurm``; root, Debian).

One sweep goes through ``make slurm GPUS=0`` as a user would submit it: TNT (trained on demand,
long enough to be interrupted), DynamicViT (cancelled while it trains), no pruning and Top-K.
While it runs, the test requeues the TNT job with ``scontrol requeue`` once it has a checkpoint,
then shortens its time limit so that submitit's USR2 requeues it again, and ``scancel``s the
DynamicViT job. Then: TNT resumed from last.ckpt both times, the results store has exactly one
``ok`` record per completed config, no ``failed`` one, the cancelled job's record says so, every
record names its SLURM job; and the same ``make slurm`` again skips what is recorded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from tnt_lightning.results import read_records

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
METHODS = ["tnt", "dynamicvit", "none", "topk"]  # job index = position
TIME_MIN = 10  # USR2 120 s before the limit (signal_delay_s; a fifth of 10 min is not less)
# Short recipes on 10 batches an epoch: DynamicViT trains 2 epochs, TNT 40 (400 steps, 0.25-0.45 s
# each on one core of the machines seen): its second attempt must still be training when USR2 comes,
# up to ~35 s after the new time limit is set (slurmctld checks limits every 30 s). At 10 epochs a
# machine at 0.25 s per step finished before USR2 came.
TNT_EPOCHS = 40
RUN_ARGS = (
    f"method={','.join(METHODS)} keep_rate=0.5 measure.throughput=false skip_recorded=true "
    f"model.pretrain.epochs=1 +trainer.limit_train_batches=10 data.train_overrides.epochs={TNT_EPOCHS} "
    "+data.train_overrides.dynamicvit.epochs=2"
)
MAKE_VARS = ["GPUS=0", "CPUS=1", "MEM_GB=2", f"TIME_MIN={TIME_MIN}", f"ARGS={RUN_ARGS}"]


def wait_until(what: str, check, timeout_s: float, every_s: float = 1.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def scontrol_job(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"\b(\w+)=(\S*)", out))


def squeue(array: str) -> list[str]:
    """The sweep's jobs SLURM still holds (pending, running, completing)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", array], capture_output=True, text=True).stdout
    return out.split()


def seconds(runtime: str) -> int:
    """SLURM's [D-]HH:MM:SS as seconds."""
    days, _, clock = runtime.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


class Job:
    """One array task of the sweep and its submitit log (all attempts append to it)."""

    def __init__(self, sweep_dir: Path, job_id: str) -> None:
        self.id = job_id
        self.folder = sweep_dir / ".submitit" / job_id

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace")
            for p in sorted(self.folder.glob(f"{self.id}_0_log.*"))
            if p.exists()
        )

    def attempts(self) -> list[str]:
        """Its stdout (our log lines, submitit's) cut at each start: one piece per attempt."""
        out = self.folder / f"{self.id}_0_log.out"
        return (
            out.read_text(errors="replace").split("Starting with JobEnvironment")[1:] if out.exists() else []
        )


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root: scripts/slurm_local.sh installs and starts SLURM (make test-slurm)")
    subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "start"], check=True, timeout=900)


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-root")
    paths = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **os.environ,
        "TNT_ROOT": str(root),
        "PYTHONPATH": os.pathsep.join(paths),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


@pytest.fixture
def cleanup():
    """Callables run at teardown, pass or fail (cancel the sweep's jobs, stop make)."""
    steps: list = []
    yield steps
    for step in reversed(steps):
        step()


def make_slurm(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(REPO), "slurm", f"PYTHON={sys.executable}", *MAKE_VARS],
        env=env,
        stdout=open(log, "w"),  # noqa: SIM115 - the process owns it
        stderr=subprocess.STDOUT,
    )


def test_sweep_survives_requeue_timeout_and_cancel(env, cleanup):
    root = Path(env["TNT_ROOT"])
    # The backbone first, here, so that the jobs only evaluate and train methods.
    subprocess.run(
        [sys.executable, "run.py", "task=pretrain", "trainer=cpu", "logger=csv", "model.pretrain.epochs=1",
         "+trainer.limit_train_batches=10", f"paths.results_dir={root}/pretrain-results"],
        cwd=REPO, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip

    make = make_slurm(env, root / "make-1.log")
    cleanup.append(lambda: make.poll() is None and make.terminate())
    sweep_dir = wait_until(
        "the sweep's submission",
        lambda: next(iter((root / "outputs" / "multiruns").glob("*/.submitit")), None),
        60,
    ).parent
    array = wait_until(
        "submitit's job folders",
        lambda: next((p.name.split("_")[0] for p in (sweep_dir / ".submitit").glob("*_0")), None),
        60,
    )
    cleanup.append(lambda: subprocess.run(["scancel", array]))
    tnt, dynamicvit = Job(sweep_dir, f"{array}_0"), Job(sweep_dir, f"{array}_1")

    # scancel DynamicViT while it trains (inside its run, so it can write its record).
    wait_until("DynamicViT training", lambda: "training dynamicvit once" in dynamicvit.log(), 240, 0.5)
    subprocess.run(["scancel", dynamicvit.id], check=True)

    # scontrol requeue TNT once it has a checkpoint (epoch 0 done, epoch 1 under way).
    checkpoint = wait_until(
        "TNT's first checkpoint",
        lambda: (
            "Epoch 1:" in tnt.log() and next(iter((root / "cache" / "methods").glob("tnt-*/last.ckpt")), None)
        ),
        300,
    )
    assert checkpoint.exists()
    subprocess.run(["scontrol", "requeue", tnt.id], check=True)

    # As soon as its second attempt has resumed, a time limit 130 s away: USR2 (120 s before the
    # limit, at slurmctld's next check, within 30 s) makes submitit requeue it as timed out.
    wait_until(
        "TNT's second attempt to resume",
        lambda: len(tnt.attempts()) >= 2 and "resuming tnt" in tnt.attempts()[1],
        240,
        0.5,
    )
    limit = seconds(scontrol_job(tnt.id)["RunTime"]) + 130
    subprocess.run(
        ["scontrol", "update", f"JobId={tnt.id}", f"TimeLimit={limit // 60}:{limit % 60:02d}"], check=True
    )
    wait_until("USR2 before the time limit", lambda: usr2_or_finished(tnt), 150)
    assert "Caught signal SIGUSR2" in tnt.log(), (
        f"TNT finished its {TNT_EPOCHS} epochs before USR2 came: raise TNT_EPOCHS for this machine"
    )
    wait_until("TNT requeued", lambda: scontrol_job(tnt.id).get("Restarts") == "2", 60)
    subprocess.run(["scontrol", "update", f"JobId={tnt.id}", f"TimeLimit={TIME_MIN}"], check=True)

    make.wait(timeout=600)
    make_log = (root / "make-1.log").read_text()
    # make returns once every job has written its result; the processes may still be closing.
    wait_until("the sweep's jobs to leave the queue", lambda: not squeue(array), 120)

    # TNT: three attempts, the later two resumed from last.ckpt, never from epoch 0 again.
    attempts = tnt.attempts()
    assert len(attempts) == 3, make_log[-3000:]
    for attempt in attempts[1:]:
        resumed = re.search(r"resuming tnt training from epoch (\d+)", attempt)
        # Lightning's progress bar ("Epoch 3/10:"; none if USR2 came before the attempt's first step)
        epochs = [int(e) for e in re.findall(r"Epoch (\d+)(?:/\d+)?:", attempt)]
        if resumed is None:  # its training had ended before this attempt: it loads the artefact
            assert not epochs and "training tnt once" not in attempt, "an attempt trained from epoch 0"
            continue
        assert int(resumed.group(1)) >= 1, "a requeued attempt did not resume from last.ckpt"
        assert not epochs or min(epochs) >= int(resumed.group(1)), f"it trained epochs {sorted(set(epochs))}"
    last = TNT_EPOCHS - 1
    assert any(re.search(rf"Epoch {last}(?:/{TNT_EPOCHS})?:", a) for a in attempts[1:])  # it ran to its end
    assert "this job is timed-out" in tnt.log()
    assert scontrol_job(tnt.id)["JobState"] == "COMPLETED"
    assert scontrol_job(dynamicvit.id)["JobState"] == "CANCELLED"

    records = read_records(root / "results", history=True)  # every attempt, not only the current ones
    # Checked after the rerun, so that one failing part does not hide the others.
    problems = record_problems(records, {f"{array}_{i}" for i in range(len(METHODS))})
    ok_before = {r["run_id"] for r in records if r["status"] == "ok"}
    assert {r["method"] for r in records if r["status"] == "ok"} == {"tnt", "none", "topk"}

    # The same submission again: what is recorded is skipped, the cancelled config runs.
    rerun = make_slurm(env, root / "make-2.log")
    assert rerun.wait(timeout=600) == 0, (root / "make-2.log").read_text()[-3000:]
    records = read_records(root / "results", history=True)  # every attempt, not only the current ones
    by_method = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    for method in METHODS:
        assert [r["status"] for r in by_method[method]].count("ok") == 1, (method, by_method[method])
    new_ok = {r["method"] for r in records if r["status"] == "ok" and r["run_id"] not in ok_before}
    assert new_ok == {"dynamicvit"}
    assert not problems, "\n".join(problems)


def usr2_or_finished(job: Job) -> bool:
    """USR2 reached the job, or its current attempt ended without it (waiting longer is pointless)."""
    return "Caught signal SIGUSR2" in job.log() or "Job completed successfully" in job.attempts()[-1]


def record_problems(records: list[dict], job_ids: set[str]) -> list[str]:
    """What is wrong with the first sweep's records: one ok per completed config, no failed one, the
    cancelled one recorded as such, every record with its SLURM job id."""
    by_method = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r["status"])
    problems = [
        f"{method}: {by_method[method].count('ok')} ok records, not 1 ({by_method[method]})"
        for method in ("tnt", "none", "topk")
        if by_method[method].count("ok") != 1
    ]
    problems += [
        f"{r['method']}: a failed record ({r['error']['type']}: {r['error']['message'][:80]})"
        for r in records
        if r["status"] == "failed"
    ]
    if not by_method["dynamicvit"] or not set(by_method["dynamicvit"]) <= {"interrupted", "cancelled"}:
        problems.append(f"dynamicvit (cancelled): records {by_method['dynamicvit']}")
    problems += [
        f"{r['method']} ({r['status']}): slurm {r.get('slurm')!r}, not one of {sorted(job_ids)}"
        for r in records
        if (r.get("slurm") or {}).get("job_id") not in job_ids
    ]
    return problems
