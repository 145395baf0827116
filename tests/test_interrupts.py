"""Interruptions are told by their exception classes (Lightning's, submitit's), not by names."""

from __future__ import annotations

import signal

from lightning.pytorch.utilities.exceptions import SIGTERMException
from submitit.core.utils import FailedJobError, UncompletedJobError

from tnt_lightning.tasks.interrupts import outcome

SUBMITIT_FILE = "/site-packages/submitit/core/job_environment.py"


def _raise_from(filename: str, exc: BaseException) -> tuple[BaseException, object]:
    try:
        exec(compile("raise exc", filename, "exec"), {"exc": exc})
    except BaseException as e:
        return e, e.__traceback__
    raise AssertionError("nothing was raised")


class StoppedByScheduler(SIGTERMException):
    """A subclass of Lightning's exception (a callback's own): still a SIGTERM."""


def test_a_subclass_of_lightnings_sigterm_exception_is_a_sigterm():
    raised, tb = _raise_from("loop.py", StoppedByScheduler())
    assert outcome(raised, tb) == ("interrupted", 128 + signal.SIGTERM)


def test_a_system_exit_merely_named_like_lightnings_is_no_sigterm():
    lookalike = type("SIGTERMException", (SystemExit,), {})
    raised, tb = _raise_from("loop.py", lookalike())
    assert outcome(raised, tb) == ("interrupted", None)


def test_submitits_uncompleted_job_error_is_a_time_out_and_a_lookalike_a_failure():
    raised, tb = _raise_from(SUBMITIT_FILE, UncompletedJobError("not requeued"))
    assert outcome(raised, tb) == ("timed_out", None)
    raised, tb = _raise_from(SUBMITIT_FILE, FailedJobError("another job failed"))
    assert outcome(raised, tb) == ("failed", None)
    lookalike = type("UncompletedJobError", (RuntimeError,), {})
    raised, tb = _raise_from(SUBMITIT_FILE, lookalike("same name, other class"))
    assert outcome(raised, tb) == ("failed", None)
