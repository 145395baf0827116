"""How a job that is stopped from outside ends: recorded with its own status, exit status non-zero.

SIGTERM (``scancel``, ``kill``, a scheduler's time-out) and SIGINT (Ctrl-C) raise
:class:`JobInterrupted` in the running task; the task's record says ``interrupted`` and the
process exits with 128 + the signal's number, so a sweep never ends with exit 0 and jobs left
undone. Under ``hydra/launcher=slurm``, :mod:`tnt_lightning.results.slurm` tells requeues from cancels:
a requeued attempt (SIGTERM of ``scontrol requeue``, or submitit's USR2 requeue and its
``SystemExit(-1)``) is recorded as ``preempted`` (the requeued job resumes and records the
outcome), a cancelled one as ``interrupted``, and one submitit will not requeue again as ``timed_out``.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from ..results import slurm

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DEFERRED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


class JobInterrupted(BaseException):
    """A stop signal arrived while a task ran (a BaseException: no ``except Exception`` eats it)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise JobInterrupted(signum)


@contextlib.contextmanager
def interruption_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`JobInterrupted` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Under hydra/launcher=slurm, SIGTERM is tnt_lightning.results.slurm's: it asks slurmctld whether the
    # job was requeued or cancelled, and raises accordingly. Keep it.
    ours = [s for s in STOP_SIGNALS if getattr(signal.getsignal(s), "__module__", "") != slurm.__name__]
    previous = {s: signal.signal(s, _raise_interrupted) for s in ours}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold stop and requeue signals back while a record is written, so it is written whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, DEFERRED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _from_submitit(tb: TracebackType | None) -> bool:
    return any("submitit" in frame.filename for frame in traceback.extract_tb(tb))


def _loaded_class(module: str, name: str) -> type[BaseException] | None:
    """The exception class ``module.name`` if its module is loaded, else None.

    An exception of that class can only have been raised once its module was imported, so a module
    not loaded means "not this class" -- and importing Lightning here would take seconds on the way
    out of a stopped job. A loaded module without the class is an error, not a silent mismatch.
    """
    loaded = sys.modules.get(module)
    return None if loaded is None else getattr(loaded, name)


def _is_instance(exc: BaseException, module: str, name: str) -> bool:
    cls = _loaded_class(module, name)
    return cls is not None and isinstance(exc, cls)


def _submitit_gave_up(exc: BaseException, tb: TracebackType | None) -> bool:
    """submitit's signal handler raised UncompletedJobError: it will not requeue this job again.
    (Its subclass FailedJobError reports another job's failure: a failure, not a time-out.)"""
    return (
        _is_instance(exc, "submitit.core.utils", "UncompletedJobError")
        and not _is_instance(exc, "submitit.core.utils", "FailedJobError")
        and _from_submitit(tb)
    )


def outcome(exc: BaseException | None, tb: TracebackType | None) -> tuple[str, int | None]:
    """(record status, exit code to end the process with, or None to let the exception go on)."""
    if exc is None:
        return "ok", None
    noted = slurm.interruption_status()  # SLURM requeued or cancelled the job: the launcher ends it
    if noted is not None:
        return noted, None
    if _submitit_gave_up(exc, tb):
        return "timed_out", None
    for link in _chain(exc):
        if isinstance(link, JobInterrupted):
            return "interrupted", link.exit_code
        if isinstance(link, KeyboardInterrupt):
            return "interrupted", 128 + signal.SIGINT
    if isinstance(exc, SystemExit):
        if exc.code == -1 and _from_submitit(tb):
            return "preempted", None
        if _is_instance(exc, "lightning.pytorch.utilities.exceptions", "SIGTERMException"):  # no exit code
            return "interrupted", 128 + signal.SIGTERM
        return "interrupted", None
    return "failed", None
