"""Temporary files of atomic writes (results index, cache): named after their writer, removed once
it is gone.

A file is written to ``.<name>.<host>-<pid>.tmp`` beside its target, then renamed over it. A kill
between the two leaves the temporary file; :func:`remove_stale_temps` removes it later: at once
when its writer ran on this host and its pid is gone, after :data:`STALE_TEMP_S` otherwise (a
writer on another host of a shared folder is never judged by a pid of this one). Names of the
older ``.<name>.<pid>.tmp`` form are judged by their pid on this host.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

STALE_TEMP_S = 3600.0  # a write renames its file within seconds; its mtime moves while it writes


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> str | None:
    """When the process ``pid`` started (clock ticks since boot, Linux), to tell a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """``running``, ``stopped`` (SIGSTOP, Ctrl-Z) or ``sleeping``..., from /proc; None if unknown."""
    states = {"R": "running", "S": "sleeping", "D": "in I/O", "T": "stopped", "t": "stopped", "Z": "zombie"}
    try:
        code = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return states.get(code, code)


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


def is_stale_temp(tmp: Path) -> bool:
    """Whether the writer of the temporary file ``tmp`` is gone (see the module's doc)."""
    try:
        age = time.time() - tmp.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_TEMP_S:
        return True
    writer = tmp.name[: -len(".tmp")]
    pid = writer.rpartition("-")[2]
    if pid.isdigit() and writer[: -len(pid) - 1].endswith(f".{socket.gethostname()}"):
        return not pid_alive(int(pid))  # written on this host
    old_pid = writer.rpartition(".")[2]  # the older form .<name>.<pid>.tmp
    return old_pid.isdigit() and not pid_alive(int(old_pid))


def stale_temps(folder: Path, pattern: str = ".*.tmp") -> list[Path]:
    """The temporary files matching ``pattern`` below ``folder`` whose writer is gone."""
    return [p for p in sorted(folder.rglob(pattern)) if p.is_file() and is_stale_temp(p)]


def remove_stale_temps(target: Path) -> None:
    """Remove the temporary files of ``target`` (and of its checksum) left by killed writers."""
    if not target.parent.is_dir():
        return
    for tmp in target.parent.glob(f".{target.name}*.tmp"):
        if is_stale_temp(tmp):
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (mode from the umask)."""
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
