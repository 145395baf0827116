"""Interruptions are told by their exception classes (Lightning's, submitit's), not by names; how an
attempt ended decides its status and exit code; a second SIGTERM while the record is built loses nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException
from submitit.core.utils import FailedJobError, UncompletedJobError

from tnt_lightning.results import read_records
from tnt_lightning.tasks.interrupts import JobInterrupted, outcome

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
