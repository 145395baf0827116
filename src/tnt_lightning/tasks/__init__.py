"""Tasks (``task=``): what a run does with the composed config.

:func:`run_task` is the one door: it checks the config and the results folder, claims the
experiment in the results store (so that it is never run twice, not even by two sweeps at once),
runs the task with stop signals turned into recorded interruptions, and releases the claim.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config import Task, check_environment, validate
from ..errors import ConfigError
from ..measure.memory import keep_freed_memory
from ..results import ResultsStore, StoreError, config_key
from .interrupts import interruption_signals, outcome
from .preflight import preflight
from .quiet import quiet
from .records import current_attempt, new_run_id, process_rank

log = logging.getLogger(__name__)


def _describe(holder: dict[str, Any]) -> str:
    slurm = holder.get("slurm") or {}
    where = f"SLURM job {slurm['job_id']}" if slurm.get("job_id") else f"pid {holder.get('pid')}"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started_at", 0)))
    return f"{where} on {holder.get('host')}, since {started}"


def run_task(cfg: DictConfig) -> dict[str, Any] | None:
    """Validate ``cfg`` and run its task; returns the run's record (None if another job runs it).

    A stopped job (SIGTERM, SIGINT) is recorded as ``interrupted`` and ends the process with
    128 + the signal's number; a failure is recorded and raised.
    """
    keep_freed_memory()  # a sweep's jobs share this process (memory.py)
    from .inputs import resolve_inputs, stamp_data_content, stamp_method_version  # imports timm's metadata

    resolve_inputs(cfg)  # the resolved preprocessing goes into the record and the key
    stamp_method_version(cfg)  # so does the method's code version
    validate(cfg)
    check_environment(cfg)
    preflight(cfg)  # the method on the backbone, before any record or logger (preflight.py)
    # Lightning's import alone takes seconds: a config refused above fails before it, silenced here.
    quiet(cfg.get("verbose", False))
    stamp_data_content(cfg)  # a folder data set counts by its images, not where they lie
    store = ResultsStore(cfg.paths.results_dir)
    try:
        store.check_writable()
    except StoreError as e:
        raise ConfigError(str(e)) from e
    task = Task(cfg.task)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    key = config_key(config)
    if process_rank() != 0:  # DDP ranks > 0 follow rank 0, which holds the claim
        return _dispatch(cfg, task)
    admission = store.begin(task.value, key, new_run_id(), bool(cfg.skip_recorded))
    if admission.recorded is not None:
        done = admission.recorded
        print(
            f"{task.value}: already recorded as run {done['run_id']} ({done['created_at']}); skipped "
            f"(skip_recorded=false runs it again)"
        )
        return done
    if admission.running_elsewhere is not None:
        print(f"{task.value}: running already as {_describe(admission.running_elsewhere)}; skipped")
        return None
    token = current_attempt.set(admission.claim.holder["attempt_id"])
    try:
        with interruption_signals():
            return _dispatch(cfg, task)
    except BaseException as exc:
        status, exit_code = outcome(exc, exc.__traceback__)
        if exit_code is not None:
            print(f"{task.value}: {status} ({exc}); exiting with status {exit_code}")
            raise SystemExit(exit_code) from exc
        raise
    finally:
        current_attempt.reset(token)
        admission.claim.release()


def _dispatch(cfg: DictConfig, task: Task) -> dict[str, Any]:
    if task is Task.eval:
        from .evaluate import evaluate

        return evaluate(cfg)
    if task is Task.pretrain:
        from .pretrain import pretrain

        return pretrain(cfg)
    if task in (Task.train, Task.train_eval):
        from .train import train

        record = train(cfg)
        if task is Task.train:
            return record
        from .evaluate import evaluate

        return evaluate(cfg)
    if task is Task.visualize:
        from .visualize import visualize

        return visualize(cfg)
    raise NotImplementedError(f"task={task.value} is not available yet")
