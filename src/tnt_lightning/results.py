"""The results store: one JSON line per run in ``<results_dir>/results.jsonl``.

Appends are atomic and safe between concurrent jobs: under a file lock the file is copied with
the new line to a temporary file that then replaces it, so a killed run never leaves a broken or
half-written line. Reading skips nothing silently: a malformed line is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

RESULTS_FILE = "results.jsonl"

# Keys of the resolved config that do not change what a run measures; they are left out of
# ``config_key`` so that a run is recognised whatever folder or logger it used.
VOLATILE_CONFIG_KEYS = ("paths", "logger", "hydra", "sweep_name", "tags", "skip_recorded")


def results_path(results_dir: str | Path) -> Path:
    return Path(results_dir).expanduser() / RESULTS_FILE


def append_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Append ``record`` as one line, atomically."""
    path = results_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    with FileLock(str(path) + ".lock"):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                if path.exists():
                    with open(path, "rb") as old:
                        while chunk := old.read(1 << 20):
                            out.write(chunk)
                out.write(line.encode())
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def read_records(results_dir: str | Path) -> list[dict[str, Any]]:
    """All records, oldest first (an empty list if there is no results file yet)."""
    return list(iter_records(results_path(results_dir)))


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number} is not valid JSON ({e})") from e


def find_recorded(results_dir: str | Path, key: str, task: str) -> dict[str, Any] | None:
    """The newest ``ok`` record of ``task`` whose config has ``key``, or None (resumable sweeps)."""
    found = None
    for record in read_records(results_dir):
        if record.get("config_key") == key and record.get("task") == task and record.get("status") == "ok":
            found = record
    return found


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines a run's result (volatile keys left out)."""
    kept = {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}
    # Token-map settings only matter to task=visualize, and their folder never does.
    if kept.get("task") == "visualize" and isinstance(kept.get("visualize"), dict):
        kept["visualize"] = {k: v for k, v in kept["visualize"].items() if k != "out_dir"}
    else:
        kept.pop("visualize", None)
    return kept


def config_key(config: dict[str, Any]) -> str:
    """A stable hash of what determines a run's result (:func:`comparable_config`)."""
    blob = json.dumps(comparable_config(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
