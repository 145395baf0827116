"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, made to survive requeues.

What it adds to ``submitit_slurm`` (hydra-submitit-launcher 1.2, submitit 1.5):

* **Time limits**: submitit asks SLURM for USR2 ``signal_delay_s`` before the limit; on it, the
  job checkpoints (this launcher's :meth:`checkpoint`: the same job, resubmitted as it was) and
  requeues itself, up to ``max_num_timeout`` times (hydra-submitit's default 0 never requeues).
  Training then resumes from its ``last.ckpt``. The delay is clamped to
  ``signal_delay_max_fraction`` of the time limit, so a short job does not get USR2 at once.
* **Preemption**: a USR2 well before the limit (submitit's rule: before 80% of it, or before
  10 minutes from its end) is a preemption; it is requeued up to ``max_num_preempt`` times
  (submitit alone: without limit). A requeue from outside (``scontrol requeue``, a preempting
  partition) sends SIGTERM instead; SLURM requeues the job by itself.
* **What the run knows**: every USR2/SIGTERM and what was done about it is noted in
  :mod:`tnt_lightning.results.slurm`, so that a run's record can say ``preempted`` rather than ``failed``.
* **Checks before submitting** (also for ``make slurm-dry``): what sbatch would refuse (no
  tasks, no CPUs, ...) and a trainer that does not match the GPUs asked for.

Everything else, and the waiting until every job ends, is hydra-submitit's.
"""

import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


@dataclass
class TntSlurmQueueConf(SlurmQueueConf):
    """hydra-submitit's SLURM settings, with requeue defaults for training that resumes."""

    _target_: str = "hydra_plugins.tnt_lightning_slurm.TntSlurmLauncher"
    # USR2 this long before the time limit (submitit's default 120), but at most
    # signal_delay_max_fraction of the limit: a 2-minute job gets it 24 s before its end.
    signal_delay_s: int = 120
    signal_delay_max_fraction: float = 0.2
    # Requeues after reaching the time limit (each resumes from the last checkpoint).
    max_num_timeout: int = 3
    # Requeues after a preemption signalled with USR2 (submitit alone: unlimited).
    max_num_preempt: int = 10


ConfigStore.instance().store(
    group="hydra/launcher", name="tnt_slurm", node=TntSlurmQueueConf, provider="tnt_lightning"
)


def tasks_per_node(gpus_per_node: int | None) -> int:
    """One task per GPU (DDP), one task for a CPU job."""
    return max(1, int(gpus_per_node or 0))


OmegaConf.register_new_resolver("tnt_tasks_per_node", tasks_per_node, replace=True)


def effective_signal_delay(signal_delay_s: float, timeout_min: float, max_fraction: float) -> int:
    """Seconds before the time limit at which USR2 comes: the delay asked, clamped to a fraction of
    the limit (and at least 1 s, as sbatch's ``--signal`` needs)."""
    return max(1, int(min(signal_delay_s, max_fraction * timeout_min * 60)))


def submitit_timed_out(walltime_s: float, timeout_min: float) -> bool:
    """submitit's own rule (``SignalHandler.has_timed_out``): a USR2 after min(80% of the limit,
    the limit - 10 min) is a time-out, an earlier one a preemption."""
    limit = timeout_min * 60
    return walltime_s >= min(0.8 * limit, limit - 600)


def submission_errors(params: dict[str, Any], trainer: dict[str, Any] | None) -> list[str]:
    """Why sbatch (or the job) would refuse these launcher settings; empty if none is known."""
    errors = []
    for key, least in (("nodes", 1), ("tasks_per_node", 1), ("cpus_per_task", 1), ("timeout_min", 1)):
        value = params.get(key)
        if value is None and key == "cpus_per_task":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            errors.append(f"hydra.launcher.{key}={value!r}: must be an integer >= {least}")
    gpus = params.get("gpus_per_node")
    if gpus is not None and (not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0):
        errors.append(f"hydra.launcher.gpus_per_node={gpus!r}: must be an integer >= 0 (0: a CPU job)")
    mem = params.get("mem_gb")
    if mem is not None and (not isinstance(mem, int | float) or mem <= 0):
        errors.append(f"hydra.launcher.mem_gb={mem!r}: must be > 0 (GB per node), or null")
    for key in ("max_num_timeout", "max_num_preempt"):
        if not isinstance(params.get(key), int) or params[key] < 0:
            errors.append(f"hydra.launcher.{key}={params.get(key)!r}: must be an integer >= 0")
    fraction = params.get("signal_delay_max_fraction")
    if not isinstance(fraction, int | float) or not 0 < fraction < 1:
        errors.append(f"hydra.launcher.signal_delay_max_fraction={fraction!r}: must be in (0, 1)")
    if trainer is not None and isinstance(gpus, int) and errors == []:
        errors += trainer_errors(gpus, params["tasks_per_node"], params["nodes"], trainer)
    return errors


def trainer_errors(gpus: int, tasks: int, nodes: int, trainer: dict[str, Any]) -> list[str]:
    """A Lightning trainer that cannot run in a job with these GPUs and tasks."""
    accelerator = str(trainer.get("accelerator"))
    devices = trainer.get("devices")
    if gpus == 0 and accelerator in ("gpu", "cuda"):
        return [f"trainer.accelerator={accelerator} but hydra.launcher.gpus_per_node=0: use trainer=cpu"]
    if gpus > 0 and accelerator == "cpu":
        return [f"trainer.accelerator=cpu but hydra.launcher.gpus_per_node={gpus}: use trainer=gpu or ddp"]
    if tasks > 1 and devices != tasks:
        return [
            f"hydra.launcher.tasks_per_node={tasks} (one DDP process per task) but trainer.devices={devices}:"
            " they must be equal (trainer=ddp trainer.devices=N)"
        ]
    if nodes > 1 and trainer.get("num_nodes") != nodes:
        return [f"hydra.launcher.nodes={nodes} but trainer.num_nodes={trainer.get('num_nodes')}"]
    return []


def node_fit_errors(params: dict[str, Any]) -> list[str]:
    """A request larger than every node of the partition (sbatch takes it; it pends forever).

    Asks ``sinfo`` for the partition's nodes; says nothing where sinfo is not available.
    """
    import shutil
    import subprocess

    if shutil.which("sinfo") is None:
        return []
    command = ["sinfo", "-h", "-N", "-o", "%c %m"]
    if params.get("partition"):
        command += ["-p", str(params["partition"])]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
        nodes = [tuple(int(v.rstrip("+")) for v in line.split()) for line in out.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    if not nodes:
        return []
    cpus = (params.get("cpus_per_task") or 1) * params["tasks_per_node"]
    mem_mb = params["mem_gb"] * 1024 if params.get("mem_gb") else 0
    if any(cpus <= node_cpus and mem_mb <= node_mem for node_cpus, node_mem in nodes):
        return []
    largest = ", ".join(f"{c} CPUs/{m // 1024} GB" for c, m in sorted(set(nodes))[-3:])
    return [
        f"{cpus} CPUs and {params.get('mem_gb')} GB per node fit no node of partition "
        f"{params.get('partition') or '(default)'} (largest: {largest}); set CPUS= and MEM_GB= "
        "(hydra.launcher.cpus_per_task, mem_gb)"
    ]


class TntSlurmLauncher(SlurmLauncher):
    """hydra-submitit's SlurmLauncher with counted requeues, a clamped signal delay and checks."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.tnt_params = {
            k: self.params.pop(k)
            for k in ("max_num_preempt", "signal_delay_max_fraction")
            if k in self.params
        }
        self.requested_signal_delay_s = self.params.get("signal_delay_s")
        self.preemptions = 0
        self.timeouts = 0
        self._started_at = time.time()

    def check(self) -> None:
        """Refuse, with every reason at once, what sbatch or the job would refuse."""
        from tnt_lightning.errors import ConfigError

        trainer = None
        if self.config is not None and "trainer" in self.config:
            trainer = OmegaConf.to_container(self.config.trainer, resolve=True)
        errors = submission_errors({**self.params, **self.tnt_params}, trainer)
        if errors:
            raise ConfigError("cannot submit this SLURM job:\n  " + "\n  ".join(errors))
        self.params["signal_delay_s"] = effective_signal_delay(
            self.requested_signal_delay_s,
            self.params["timeout_min"],
            self.tnt_params["signal_delay_max_fraction"],
        )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        self.check()
        errors = node_fit_errors(self.params)
        if errors:
            from tnt_lightning.errors import ConfigError

            raise ConfigError("cannot submit this SLURM job:\n  " + "\n  ".join(errors))
        log.info(
            "submitting %d job(s); this waits until the last one ends (make slurm-status shows progress)",
            len(job_overrides),
        )
        return super().launch(job_overrides, initial_job_idx)

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Run one job (inside SLURM), noting the signals it gets, with hydra-submitit's job.

        An attempt that ends because the job was requeued never returns: whatever it raised
        (SystemExit(-1) from submitit, or an error while closing W&B on the way out) becomes
        :class:`~tnt_lightning.results.slurm.SlurmRequeued`, so submitit writes no result and the waiting
        launcher waits for the rerun instead of taking this attempt as the job's end. A cancelled
        attempt returns a failed JobReturn, so the launcher gets a result for it.
        """
        from hydra.core.utils import JobStatus

        from tnt_lightning.results import slurm

        self._started_at = time.time()
        slurm.watch_sigterm(signal.getsignal(signal.SIGTERM))
        try:
            result = super().__call__(*args, **kwargs)
        except slurm.SlurmCancelled as error:
            result = JobReturn(overrides=list(args[0]), status=JobStatus.FAILED, _return_value=error)
        except BaseException as error:
            state = slurm.interruption()
            if state is not None and state["requeued"]:
                raise slurm.SlurmRequeued(state["reason"]) from error
            raise
        state = slurm.interruption()
        if state is not None and state["requeued"]:
            raise slurm.SlurmRequeued(state["reason"])
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit's USR2 handler on rank 0: the job to requeue, or None for no requeue.

        The requeued job is this one as submitted (same overrides); what it had done lives on
        disk (last.ckpt, trained artefacts, the results store). submitit then runs
        ``scontrol requeue`` and raises ``SystemExit(-1)`` in the running task.
        """
        from tnt_lightning.results import slurm

        timed_out = submitit_timed_out(time.time() - self._started_at, self.params["timeout_min"])
        if timed_out and self.timeouts >= self.params["max_num_timeout"]:
            slurm.note_usr2(requeued=False, reason=f"time limit reached {self.timeouts + 1} time(s)")
            return None
        if not timed_out and self.preemptions >= self.tnt_params["max_num_preempt"]:
            slurm.note_usr2(requeued=False, reason=f"preempted {self.preemptions + 1} time(s)")
            return None
        if timed_out:
            self.timeouts += 1
        else:
            self.preemptions += 1
        slurm.note_usr2(requeued=True, reason="time limit" if timed_out else "preemption")
        return super().checkpoint(*args, **kwargs)
