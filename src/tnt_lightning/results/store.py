"""The results store: every run's record, findable in constant time, never run or recorded twice.

Layout of ``<results_dir>/``:

* ``results.jsonl``: one JSON line per finished attempt, appended (``O_APPEND``, one write per
  line, under the store lock). It is the view people, reports and W&B read; a record's current
  version is the newest ``ok`` one of its experiment, else its newest attempt.
* ``index/<kk>/<task>-<config_key>.json``: the current record of each experiment, replaced
  atomically. "Is this config recorded?" reads one small file, however long the history.
* ``claims/<task>-<config_key>.json``: the job running that experiment now (pid, host, SLURM job),
  created exclusively before the job does any work, kept fresh by a heartbeat, removed when the
  job ends. A claim of a job on this host is taken over only once its pid is gone (a stopped job,
  Ctrl-Z, keeps it: ``doctor --release KEY`` releases it on request); a claim of another host's job
  once it has had no heartbeat for :data:`CLAIM_STALE_S`. A claim of the same SLURM job is a
  requeue of it. A dead job's claim is removed by the next job that looks at the experiment.
* ``.store.lock``: held for the milliseconds a claim or an append takes.

An append writes its whole line or nothing (a failed write is cut back off, under the lock). The
claim is checked again when the record is written: a job that no longer holds it (released by
``doctor --release``) records ``claim_lost``, a status kept in the history that never counts as the
experiment's result. Every file's mode comes from the umask. A damaged or foreign line of
``results.jsonl`` is reported with its line number and skipped; ``python -m tnt_lightning.results
doctor`` also compares the index with the view (missing, extra or differing entries, duplicated
``ok`` records) and ``--repair`` moves bad and duplicated lines aside and rebuilds the index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import UserError
from . import slurm
from .identity import with_content
from .keys import CONFIG_KEY_VERSION, config_key
from .tempfiles import pid_alive, process_start, write_atomic

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
INDEX_DIR = "index"
CLAIMS_DIR = "claims"
INDEX_VERSION_FILE = "VERSION"
LOCK_FILE = ".store.lock"
LOCK_TIMEOUT_S = 120.0
CLAIM_STALE_S = 300.0
HEARTBEAT_S = 30.0
RECORD_FIELDS = ("run_id", "task", "status")
CLAIM_LOST = "claim_lost"  # written by a job whose claim was released while it ran: never current

# The claims this process holds (attempt id -> claim file): an append of a record carrying one of
# these attempt ids checks, under the lock, that the claim is still this job's.
_held: dict[str, Path] = {}


class StoreError(UserError, RuntimeError):
    """The results store cannot be used (not writable, lock held too long)."""


def results_path(results_dir: str | Path) -> Path:
    return Path(results_dir).expanduser() / RESULTS_FILE


def record_identity(record: dict[str, Any]) -> tuple[str, str]:
    """(task, config_key) of a record under the current key rule; records of older key versions
    are re-keyed from the config they carry, so they keep matching."""
    key = record.get("config_key")
    if record.get("config_key_version") != CONFIG_KEY_VERSION and isinstance(record.get("config"), dict):
        key = config_key(with_content(record["config"]))
    return str(record.get("task")), str(key or f"run:{record.get('run_id')}")


def supersedes(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """An ok record replaces anything; any other attempt only replaces another non-ok one; a
    ``claim_lost`` record replaces nothing."""
    if new.get("status") == CLAIM_LOST:
        return False
    return old is None or new.get("status") == "ok" or old.get("status") != "ok"


def deliberate_rerun(record: dict[str, Any]) -> bool:
    """The record of a run asked to run again although recorded (``skip_recorded=false``)."""
    return isinstance(record.get("config"), dict) and record["config"].get("skip_recorded") is False


@dataclasses.dataclass(frozen=True)
class DamagedLine:
    number: int
    reason: str


@dataclasses.dataclass
class Claim:
    """This job's hold on an experiment; :meth:`release` when the job ends (a heartbeat keeps it)."""

    path: Path
    holder: dict[str, Any]
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        threading.Thread(target=beat, name=f"claim-heartbeat-{self.path.stem}", daemon=True).start()

    def release(self) -> None:
        self._stop.set()
        _held.pop(self.holder["attempt_id"], None)
        with contextlib.suppress(OSError):
            if json.loads(self.path.read_text()).get("attempt_id") == self.holder["attempt_id"]:
                self.path.unlink()


@dataclasses.dataclass(frozen=True)
class Admission:
    """What :meth:`ResultsStore.begin` decided: run (with a claim), or why not."""

    claim: Claim | None = None
    recorded: dict[str, Any] | None = None  # already recorded ok
    running_elsewhere: dict[str, Any] | None = None  # the live claim of another job


def _same_slurm_job(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Both claims come from one SLURM job (its requeued attempts share the job id)."""
    return bool(a and b and a.get("job_id") and a.get("job_id") == b.get("job_id"))


def holder_alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the claim's job is alive, if it ran on this host (its pid, not a reused one); None
    for a job on another host, which only its heartbeat can speak for."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    if not pid_alive(pid):
        return False
    started = holder.get("pid_start")
    return started is None or process_start(pid) in (None, started)


class ResultsStore:
    """One results folder (``paths.results_dir``); cheap to create, safe to share between jobs."""

    def __init__(self, results_dir: str | Path) -> None:
        self.root = Path(results_dir).expanduser()
        self.path = self.root / RESULTS_FILE
        self.index_dir = self.root / INDEX_DIR
        self.claims_dir = self.root / CLAIMS_DIR

    # ------------------------------------------------------------------ checks and locking

    def check_writable(self) -> None:
        """Fail now, naming the folder, if records could not be written at the end of a run."""
        try:
            for folder in (self.root, self.index_dir, self.claims_dir):
                folder.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            if self.path.exists() and not os.access(self.path, os.W_OK):
                raise PermissionError(f"{self.path} is read-only")
        except OSError as e:
            raise StoreError(
                f"paths.results_dir={str(self.root)!r} cannot hold results ({e.strerror or e}); "
                f"give a writable folder (paths.results_dir=... or TNT_ROOT=...)"
            ) from e

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / LOCK_FILE))  # no mode: the umask decides
        try:
            with lock.acquire(timeout=LOCK_TIMEOUT_S):
                yield
        except Timeout as e:
            raise StoreError(
                f"{lock.lock_file} was held for more than {LOCK_TIMEOUT_S:.0f} s; is a job hung on it?"
            ) from e

    # ------------------------------------------------------------------ the index

    def _index_file(self, task: str, key: str) -> Path:
        return self.index_dir / key[:2] / f"{task}-{key}.json"

    def _ensure_index(self) -> None:
        """Build the index from results.jsonl once: for a store written before the index existed, or
        indexed under an older key rule (its records are re-keyed, see :func:`record_identity`)."""
        marker = self.index_dir / INDEX_VERSION_FILE
        if self._index_current(marker):
            return
        if not self.path.exists():
            self.index_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, f"{CONFIG_KEY_VERSION}\n")
            return
        with self.locked():
            if not self._index_current(marker):
                self.rebuild_index()

    @staticmethod
    def _index_current(marker: Path) -> bool:
        return marker.exists() and marker.read_text().strip() == str(CONFIG_KEY_VERSION)

    def rebuild_index(self) -> int:
        """Rebuild ``index/`` from results.jsonl (call under the lock): every entry the view does not
        hold is removed. Returns the records indexed."""
        current = self._current(self._scan()[0])
        for (task, key), record in current.items():
            self._write_index(task, key, record)
        for (task, key), path in self.index_entries().items():
            if (task, key) not in current:
                path.unlink(missing_ok=True)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.index_dir / INDEX_VERSION_FILE, f"{CONFIG_KEY_VERSION}\n")
        return len(current)

    def index_entries(self) -> dict[tuple[str, str], Path]:
        """Every index file, by the (task, config_key) its name says."""
        entries = {}
        for path in self.index_dir.glob("*/*.json") if self.index_dir.exists() else []:
            task, _, key = path.stem.partition("-")
            entries[task, key] = path
        return entries

    @staticmethod
    def _current(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        current: dict[tuple[str, str], dict[str, Any]] = {}
        for record in records:
            identity = record_identity(record)
            if supersedes(record, current.get(identity)):
                current[identity] = record
        return current

    def _write_index(self, task: str, key: str, record: dict[str, Any]) -> None:
        path = self._index_file(task, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record, default=str))

    def current(self, task: str, key: str) -> dict[str, Any] | None:
        """The current record of one experiment (any status), or None; constant time."""
        self._ensure_index()
        return self._read_index(task, key)

    def _read_index(self, task: str, key: str) -> dict[str, Any] | None:
        path = self._index_file(task, key)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            log.warning("index entry %s is unreadable (%s); treating the run as not recorded", path, e)
            return None

    def recorded(self, task: str, key: str) -> dict[str, Any] | None:
        """The ok record of one experiment, or None."""
        record = self.current(task, key)
        return record if record is not None and record.get("status") == "ok" else None

    # ------------------------------------------------------------------ claims

    def _claim_file(self, task: str, key: str) -> Path:
        return self.claims_dir / f"{task}-{key}.json"

    def _holder_is_stale(self, path: Path, holder: dict[str, Any]) -> bool:
        """A job on this host holds its claim while its pid lives, heartbeat or not (a stopped job
        sends none); a job on another host while its heartbeat is fresh."""
        alive = holder_alive_here(holder)
        if alive is not None:
            return not alive
        try:
            return time.time() - path.stat().st_mtime > CLAIM_STALE_S
        except FileNotFoundError:
            return True

    def begin(self, task: str, key: str, attempt_id: str, skip_recorded: bool) -> Admission:
        """Claim the experiment ``(task, key)`` for this job, unless it is recorded (and
        ``skip_recorded``) or another live job holds it. Checked again under the lock, so two jobs
        that start together never both run it."""
        self._ensure_index()
        path = self._claim_file(task, key)
        if skip_recorded and (done := self.recorded(task, key)) is not None:
            if path.exists():  # left by a job killed after its record: removed if it is dead
                with self.locked():
                    self._remove_if_stale(task, key)
            return Admission(recorded=done)
        self.claims_dir.mkdir(parents=True, exist_ok=True)
        me = {
            "attempt_id": attempt_id,
            "task": task,
            "config_key": key,
            "pid": os.getpid(),
            "pid_start": process_start(os.getpid()),
            "host": socket.gethostname(),
            "started_at": time.time(),
            "results_offset": self.path.stat().st_size if self.path.exists() else 0,
            "slurm": slurm.job_info(),
        }
        with self.locked():
            if path.exists():
                try:
                    holder = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    holder = {}
                requeue = _same_slurm_job(holder.get("slurm"), me["slurm"])
                if holder and not requeue and not self._holder_is_stale(path, holder):
                    return Admission(running_elsewhere=holder)
                log.warning("taking over the stale claim of %s (%s)", key, holder or "unreadable")
                self._recover(task, key, holder)
                path.unlink(missing_ok=True)
            done = self._read_index(task, key)
            if skip_recorded and done is not None and done.get("status") == "ok":
                return Admission(recorded=done)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _held[attempt_id] = path
        claim = Claim(path, me)
        claim.start_heartbeat()
        return Admission(claim=claim)

    def _remove_if_stale(self, task: str, key: str) -> None:
        """Remove the claim of ``(task, key)`` if its job is dead (call under the lock)."""
        path = self._claim_file(task, key)
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError):
            holder = {}
        if not holder or self._holder_is_stale(path, holder):
            self._recover(task, key, holder)
            path.unlink(missing_ok=True)

    def release_claim(self, path: Path) -> dict[str, Any]:
        """Remove a claim on request (``doctor --release``), whoever holds it; returns its holder.
        Its job, if it goes on, records ``claim_lost``."""
        with self.locked():
            try:
                holder = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            path.unlink(missing_ok=True)
        return holder

    def _recover(self, task: str, key: str, holder: dict[str, Any]) -> None:
        """After a job died: index a record it appended but did not index (it was killed between
        the two writes), and remove its temporary files. Reads only what it appended."""
        for tmp in (self.index_dir / key[:2]).glob(f".{task}-{key}.json.*.tmp"):
            tmp.unlink(missing_ok=True)
        attempt_id = holder.get("attempt_id")
        if not attempt_id or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(int(holder.get("results_offset", 0)))
            for line in f:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and record.get("attempt_id") == attempt_id:
                        identity = record_identity(record)
                        if supersedes(record, self._read_index(*identity)):
                            self._write_index(*identity, record)

    def claims(self) -> list[tuple[Path, dict[str, Any], bool]]:
        """Every claim file with its holder and whether it is stale."""
        found = []
        for path in sorted(self.claims_dir.glob("*.json")) if self.claims_dir.exists() else []:
            try:
                holder = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            found.append((path, holder, not holder or self._holder_is_stale(path, holder)))
        return found

    def stale_claims(self) -> list[Path]:
        """Claim files left by jobs that died."""
        return [path for path, _, stale in self.claims() if stale]

    # ------------------------------------------------------------------ appending and reading

    def append(self, record: dict[str, Any]) -> Path:
        """Record one finished attempt: appended to the view, then made current if it supersedes.

        The whole line is written or nothing (:class:`StoreError`). A record of an attempt whose
        claim this process took is checked against the claim file first: if the claim is no longer
        this attempt's, the record is written as ``claim_lost`` (its own status kept in
        ``claimed_status``), which never counts as the experiment's result."""
        self._ensure_index()
        with self.locked():
            record = self._checked_claim(record)
            self._write_line((json.dumps(record, default=str) + "\n").encode())
            identity = record_identity(record)
            if supersedes(record, self._read_index(*identity)):
                self._write_index(*identity, record)
        return self.path

    def _checked_claim(self, record: dict[str, Any]) -> dict[str, Any]:
        path = _held.get(str(record.get("attempt_id")))
        if path is None:
            return record
        try:
            holder = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            holder = {}
        if holder.get("attempt_id") == record["attempt_id"]:
            return record
        log.error(
            "the claim of this run (%s) was released or taken over while it ran (now: %s); its record "
            "is kept as %r and does not count as the experiment's result",
            path.name,
            holder.get("attempt_id") and f"attempt {holder['attempt_id']}, pid {holder.get('pid')}",
            CLAIM_LOST,
        )
        return {**record, "status": CLAIM_LOST, "claimed_status": record.get("status")}

    def _write_line(self, line: bytes) -> None:
        """Append ``line`` whole (short writes continued), or cut the file back and raise."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line stays its own line
                line = b"\n" + line
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise StoreError(
                    f"{self.path}: the record could not be written ({e}); nothing was appended"
                ) from e
        finally:
            os.close(fd)

    def _scan(self) -> tuple[list[dict[str, Any]], list[DamagedLine]]:
        records, damaged = [], []
        for _, record in self._numbered():
            if isinstance(record, DamagedLine):
                damaged.append(record)
            else:
                records.append(record)
        return records, damaged

    def _numbered(self) -> Iterator[tuple[int, dict[str, Any] | DamagedLine]]:
        """Every non-empty line with its number: the record, or why it is damaged."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as e:
                    yield number, DamagedLine(number, f"not valid JSON ({e})")
                    continue
                if not isinstance(record, dict) or any(k not in record for k in RECORD_FIELDS):
                    yield number, DamagedLine(number, f"not a run record (needs {list(RECORD_FIELDS)})")
                    continue
                yield number, record

    def records(self, history: bool = False) -> list[dict[str, Any]]:
        """The current record of every experiment, in the order they were first recorded (every
        attempt with ``history``). Damaged lines are reported with their numbers and skipped."""
        records, damaged = self._scan()
        for line in damaged:
            log.warning(
                "%s:%d skipped: %s (doctor: python -m tnt_lightning.results doctor)",
                self.path,
                line.number,
                line.reason,
            )
        if history:
            return records
        return list(self._current(records).values())

    def damaged_lines(self) -> list[DamagedLine]:
        return self._scan()[1]

    def duplicates(self) -> list[tuple[int, dict[str, Any]]]:
        """The ``ok`` records (with their line numbers) of experiments recorded ``ok`` on an earlier
        line, by a run that was not asked to run again (``skip_recorded=false``)."""
        first_ok: set[tuple[str, str]] = set()
        found = []
        for number, record in self._numbered():
            if isinstance(record, DamagedLine) or record.get("status") != "ok":
                continue
            identity = record_identity(record)
            if identity in first_ok and not deliberate_rerun(record):
                found.append((number, record))
            first_ok.add(identity)
        return found

    def index_disagreements(self) -> list[str]:
        """Where the index and the view disagree: an experiment of the view without its index
        file, an index file without a record in the view, or one naming another record."""
        current = self._current(self._scan()[0])
        entries = self.index_entries()
        found = []
        for (task, key), record in current.items():
            if (task, key) not in entries:
                found.append(f"{task} {key}: index file missing (current record: run {record['run_id']})")
                continue
            indexed = self._read_index(task, key) or {}
            if (indexed.get("run_id"), indexed.get("status")) != (record["run_id"], record["status"]):
                found.append(
                    f"{task} {key}: the index names run {indexed.get('run_id')} ({indexed.get('status')}), "
                    f"the view run {record['run_id']} ({record['status']})"
                )
        for task, key in sorted(set(entries) - set(current)):
            found.append(f"{task} {key}: index entry with no record in {RESULTS_FILE}")
        return found


def append_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Append one record to the store at ``results_dir``."""
    return ResultsStore(results_dir).append(record)


def read_records(results_dir: str | Path, history: bool = False) -> list[dict[str, Any]]:
    """The current records of the store at ``results_dir`` (every attempt with ``history``)."""
    return ResultsStore(results_dir).records(history)
