"""What a run knows about the SLURM job it runs in, and about the signals that ended it.

Under ``hydra/launcher=slurm`` (src/hydra_plugins/tnt_lightning_slurm) a job can end early in
three ways, measured against a real slurmctld (docs/slurm.md):

* USR2 before the time limit (or a USR2 preemption): submitit calls the launcher's checkpoint
  hook (:func:`note_usr2`), runs ``scontrol requeue`` and raises ``SystemExit(-1)`` from its
  signal handler, wherever the task was. Without a requeue it raises
  ``submitit.core.utils.UncompletedJobError`` instead.
* SIGTERM, from ``scontrol requeue``, ``scancel``, a preemption or the time limit itself (SIGKILL
  follows ``KillWait`` seconds later): submitit only logs it, and Lightning's ``fit`` would raise
  ``SIGTERMException`` at the next batch, elsewhere nothing would. :func:`watch_sigterm` asks
  slurmctld at once: a restart count one above ``SLURM_RESTART_COUNT`` means requeued, and it
  raises :class:`SlurmRequeued`, otherwise :class:`SlurmCancelled`, so that the run stops at
  once and writes its record before the SIGKILL. Both are ``SystemExit``s, which no
  ``except Exception`` on the way can swallow; the launcher then writes no result for a requeued
  attempt (the waiting launcher waits for the rerun) and a failed one for a cancelled job.

:func:`interruption_status` turns what was noted into a record's status.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# What ended (or is ending) this attempt, if a signal did; see interruption().
_interruption: dict[str, Any] | None = None


class SlurmRequeued(SystemExit):
    """SIGTERM because SLURM requeued this job (``scontrol requeue``, preemption): it runs again."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"SLURM job {job_id()}: {reason}; it will run again")


class SlurmCancelled(SystemExit):
    """SIGTERM without a requeue: ``scancel``, or the time limit (this job does not run again)."""


def job_id() -> str | None:
    """The id scontrol/sacct accept for this job: ``<array job>_<task>`` in an array, or None."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def job_info() -> dict[str, Any] | None:
    """SLURM job id, array job and index, restart count and submitit folder, or None outside SLURM."""
    if job_id() is None:
        return None
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return {
        "job_id": job_id(),
        "raw_job_id": os.environ.get("SLURM_JOB_ID"),
        "array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": int(task) if task else None,
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        "submitit_folder": os.environ.get("SUBMITIT_FOLDER") or _submitit_folder(),
        "node": os.environ.get("SLURMD_NODENAME"),
    }


def _submitit_folder() -> str | None:
    """The submitit log folder of the job this process runs, if submitit started it."""
    try:
        import submitit

        return str(submitit.JobEnvironment().paths.folder)
    except Exception:
        return None


def interruption() -> dict[str, Any] | None:
    """What interrupted this attempt: ``{"signal", "requeued", "reason", "at"}``, or None."""
    return _interruption


def interruption_status() -> str | None:
    """``preempted`` if this attempt ends because the job was requeued (it will run again),
    ``interrupted`` if a signal ends it without a requeue (scancel, a last time-out), else None."""
    if _interruption is None:
        return None
    return "preempted" if _interruption["requeued"] else "interrupted"


def note_usr2(requeued: bool, reason: str) -> None:
    """Called by the launcher's checkpoint hook when submitit handles USR2."""
    _note("SIGUSR2", requeued, reason)


def watch_sigterm(previous: Callable | int | None) -> None:
    """Note every SIGTERM (and whether SLURM requeued the job), then hand it to ``previous``."""

    def on_sigterm(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        if _interruption is not None:
            # submitit's USR2 handler requeued the job and is exiting, or a SIGTERM came before
            # (SLURM may send it twice): the run is unwinding already, let it write its record.
            return
        job = slurmctld_job()
        own = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        requeued = int(job.get("Restarts", own)) > own
        if requeued:
            reason = "requeued (scontrol requeue or preemption)"
        elif job.get("Reason") == "TimeLimit":
            reason = "time limit"
        else:
            reason = "cancelled (scancel)" if job else "SIGTERM (job state unknown)"
        _note("SIGTERM", requeued, reason)
        if requeued:
            raise SlurmRequeued(reason)
        raise SlurmCancelled(f"SLURM job {job_id()}: {reason}")

    signal.signal(signal.SIGTERM, on_sigterm)


def slurmctld_job() -> dict[str, str]:
    """``JobState``, ``Reason`` and ``Restarts`` of this job as slurmctld has them now ({} if it
    cannot say). At a requeue's SIGTERM, Restarts has already grown; at a time limit's, the
    reason is ``TimeLimit``; at scancel's, neither."""
    jid = job_id()
    if jid is None:
        return {}
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(re.findall(r"\b(JobState|Reason|Restarts)=(\S+)", out))


def _note(signal_name: str, requeued: bool, reason: str) -> None:
    global _interruption
    _interruption = {"signal": signal_name, "requeued": requeued, "reason": reason, "at": time.time()}
    log.warning("SLURM job %s got %s: %s (requeued: %s)", job_id(), signal_name, reason, requeued)
