"""The ranks of one DDP job, and how rank 0 tells them what it decided about a trained artefact.

Lightning's DDP launch (``strategy: ddp``) re-runs the command line for ranks > 0 (``LOCAL_RANK``,
``WORLD_SIZE`` set in their environment), by default the first time a trainer runs; under SLURM or
torchrun every rank starts at once. A trained artefact (a backbone's pretraining, a method's
training) is decided by rank 0 alone, holding the artefact's lock: it posts ``train`` (every rank
trains it, together, in one DDP run), ``cached`` or ``refused`` in a file named after the job,
which the other ranks wait for. So that they are there to read it, rank 0 starts them before it
decides (:meth:`Ranks.start`).

Every wait between ranks has a time limit (``TNT_DDP_WAIT_S``, 600 s; a rank 0 that waits for
another job's training keeps the limit from running out by touching its decision file) and a
liveness check: a rank > 0 whose rank 0 process is gone (Lightning's launch: its parent) exits at
once with status 1, naming the cause, whatever it waits for (a decision, a file, a collective).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..results import slurm

log = logging.getLogger(__name__)

RANK0_PID = "TNT_RANK0_PID"  # set by rank 0 before it launches the others (they inherit it)
JOB_TOKEN = "TNT_JOB_TOKEN"
WAIT_S_ENV = "TNT_DDP_WAIT_S"
POLL_S = 0.5
HEARTBEAT_S = 10.0  # how often rank 0, waiting for another job's lock, shows it is alive
CHOICES = ("train", "cached", "refused")


class RankError(RuntimeError):
    """A rank of a DDP job cannot go on: its rank 0 died, refused, or went silent too long."""


def wait_s() -> float:
    return float(os.environ.get(WAIT_S_ENV, "600"))


def job_token() -> str:
    """An id every process of this job shares (its DDP ranks), and no other job: the SLURM job and
    attempt, or one drawn by rank 0 before it starts the other ranks (they inherit it)."""
    info = slurm.job_info()
    if info is not None:
        return f"slurm-{info['job_id']}-{info['restart_count']}"
    return os.environ.setdefault(JOB_TOKEN, uuid.uuid4().hex[:12])


def this_rank() -> int:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank


class Ranks:
    """The processes of the job that ``trainer_cfg`` (the job's ``cfg.trainer``) trains with."""

    def __init__(self, trainer_cfg: Any = None) -> None:
        self.trainer_cfg = trainer_cfg  # None: one process

    @property
    def rank(self) -> int:
        return this_rank()

    @cached_property
    def _plan(self) -> tuple[int, bool]:
        """(world size, whether every rank runs this script): from the environment once the ranks
        run (Lightning's launch, torchrun), else from the trainer the config builds."""
        if "WORLD_SIZE" in os.environ:
            return int(os.environ["WORLD_SIZE"]), True
        if self.trainer_cfg is None:
            return 1, True
        trainer = self._trainer()
        size = trainer.num_devices * trainer.num_nodes
        return size, self._script_launcher(trainer) is not None or size == 1

    @property
    def world_size(self) -> int:
        """How many processes train an artefact: part of what determines it."""
        return self._plan[0]

    @property
    def shared(self) -> bool:
        """Whether several processes run this code and must agree (ddp_spawn's ranks run only fit)."""
        return self._plan[0] > 1 and self._plan[1]

    def _trainer(self):
        from hydra.utils import instantiate

        return instantiate(
            self.trainer_cfg, logger=False, enable_progress_bar=False, enable_checkpointing=False
        )

    @staticmethod
    def _script_launcher(trainer):
        from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

        launcher = getattr(trainer.strategy, "launcher", None)
        return launcher if isinstance(launcher, _SubprocessScriptLauncher) else None

    def start(self) -> None:
        """Make sure every rank runs: rank 0 launches the others now if Lightning would launch them
        at its first fit (so that they can follow its decisions); ranks > 0 watch rank 0."""
        if not self.shared:
            return
        if self.rank > 0:
            watch_rank_zero()
            return
        if "WORLD_SIZE" in os.environ:
            return  # launched already, or by SLURM/torchrun
        trainer = self._trainer()
        if trainer.strategy.cluster_environment.creates_processes_externally:
            return
        job_token()  # drawn before the launch, so that the other ranks inherit it
        os.environ[RANK0_PID] = str(os.getpid())
        log.info("starting the other %d DDP ranks", self.world_size - 1)
        self._script_launcher(trainer).launch(lambda: None)


# ---- liveness of rank 0, seen from a rank > 0 -------------------------------------------------


def rank_zero_gone() -> str | None:
    """Why rank 0 is known to be gone (None while it runs, or when its pid is unknown: SLURM)."""
    pid = os.environ.get(RANK0_PID)
    if pid is None:
        return None
    pid = int(pid)
    if _launched_by_rank_zero():
        if os.getppid() != pid:  # orphaned: rank 0 exited (even before anyone reaped it)
            return f"rank 0 (pid {pid}, which started this rank) exited"
        return None
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except ProcessLookupError:
        return f"rank 0 (pid {pid}) exited"
    except OSError:
        return None
    return f"rank 0 (pid {pid}) exited" if state in ("Z", "X") else None


_PARENT_AT_START = os.getppid()


def _launched_by_rank_zero() -> bool:
    return str(_PARENT_AT_START) == os.environ.get(RANK0_PID)


_watching = threading.Event()


def watch_rank_zero() -> None:
    """On a rank > 0: a thread that ends this process (status 1) as soon as rank 0 is gone, so that
    no wait (for a decision, a file, a collective) outlives it."""
    if _watching.is_set() or os.environ.get(RANK0_PID) is None:
        return
    _watching.set()

    def watch() -> None:
        while True:
            cause = rank_zero_gone()
            if cause is not None:
                print(f"rank {this_rank()}: {cause}; this rank stops (status 1)", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(POLL_S)

    threading.Thread(target=watch, name="rank-zero-watch", daemon=True).start()


# ---- rank 0 decides, the other ranks follow ---------------------------------------------------


def wait_for(path: Path, what: str, ready: Callable[[Path], bool] = Path.exists) -> Path:
    """Wait until ``ready(path)``, at most :func:`wait_s` seconds since ``path`` last changed (rank 0
    touches a pending decision while it waits for another job), checking that rank 0 runs."""
    limit = wait_s()
    started = time.time()
    while not ready(path):
        cause = rank_zero_gone() if this_rank() > 0 else None
        if cause is not None:
            raise RankError(f"rank {this_rank()}: {cause} while this rank waited for {what} ({path})")
        try:
            since = max(started, path.stat().st_mtime)
        except OSError:
            since = started
        if time.time() - since > limit:
            raise RankError(
                f"rank {this_rank()}: {what} did not come within {limit:.0f} s ({path}; "
                f"{WAIT_S_ENV} sets the limit)"
            )
        time.sleep(POLL_S)
    return path


def _post(path: Path, text: str) -> None:
    from ..results.tempfiles import write_atomic

    write_atomic(path, text)


def _decided(path: Path) -> bool:
    try:
        return path.read_text() in CHOICES
    except OSError:
        return False


def train_once(
    ranks: Ranks,
    lock: Path,
    decision_dir: Path,
    reuse: Callable[[], bool],
    train: Callable[[], None],
    refuse: Callable[[], None],
    saved: Callable[[], bool],
    may_train: bool = True,
) -> bool:
    """Train an artefact once: under its ``lock`` rank 0 ``reuse``\\ s the cached one, ``refuse``\\ s
    (raises) when not ``may_train``, or trains; every rank runs ``train`` with it (saving is rank 0's:
    ``train`` checks the rank), then waits until rank 0 has ``saved`` it. Returns whether it trained."""
    if not ranks.shared:
        with FileLock(str(lock)):
            if reuse():
                return False
            if not may_train:
                refuse()
            train()
        return True
    ranks.start()
    decision = decision_dir / f".decision-{job_token()}"
    if ranks.rank > 0:
        choice = wait_for(decision, "rank 0's decision", _decided).read_text()
        decision.with_name(f"{decision.name}.read-by-{ranks.rank}").touch()
        if choice == "refused":
            refuse()
        if choice == "train":
            train()
            wait_for(decision, "the artefact rank 0 saves", lambda _: saved())
        return choice == "train"
    _post(decision, "pending")
    try:
        with _acquire(lock, decision):
            if reuse():
                _post(decision, "cached")
                return False
            if not may_train:
                _post(decision, "refused")
                refuse()
            _post(decision, "train")
            train()
            return True
    finally:
        if _decided(decision):  # removed once every rank has read it
            for rank in range(1, ranks.world_size):
                read = decision.with_name(f"{decision.name}.read-by-{rank}")
                wait_for(read, f"rank {rank} to read the decision").unlink()
        decision.unlink(missing_ok=True)


@contextlib.contextmanager
def _acquire(lock: Path, decision: Path) -> Iterator[None]:
    """The artefact's lock, taken by rank 0; while another job holds it, the pending decision is
    touched now and then, so that the other ranks see rank 0 alive."""
    file_lock = FileLock(str(lock))
    while True:
        try:
            file_lock.acquire(timeout=HEARTBEAT_S)
            break
        except Timeout:
            decision.touch()
    try:
        yield
    finally:
        file_lock.release()
