"""Reading and writing weight files: weights-only loading, one clear error per bad file, checksums.

Every file a run reads is untrusted, whether a user named it (``model.checkpoint``,
``method.checkpoint``) or it sits in the cache. ``torch.load`` runs with ``weights_only=True``:
tensors, plain containers and numbers only, plus :data:`SAFE_GLOBALS`. A file that pickles any
other object is refused unless the user opts in for that file (``model.trust_pickle`` /
``method.trust_pickle``); the refusal lists the objects, found by reading the pickle's opcodes
without running them.

Cache files are written by :func:`save_artefact`: to a temporary name, renamed into place, then a
``<file>.sha256`` beside it (the format of ``sha256sum``, so ``sha256sum -c`` checks it too). Any
file with such a checksum beside it, a user's included, is checked against it before it is read.
The temporary files of killed writes are removed by the next write or check of the same file
(:mod:`tnt_lightning.results.tempfiles`), or by ``python -m tnt_lightning.results doctor --repair``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..results.tempfiles import remove_stale_temps, temp_path

log = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"
# Classes weights-only loading may rebuild besides tensors and containers. The official TNT,
# DynamicViT and DeiT training checkpoints pickle their argparse Namespace: rebuilding one calls
# no code of the file (object.__new__, then its attributes set from values the same restricted
# unpickler produced), so allowing it lets those files load without trusting them.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
EXPECTED = (
    "expected a PyTorch checkpoint written by torch.save (.pth/.bin) or a .safetensors file, "
    "holding a state dict (tensor names to tensors), possibly under 'model', 'state_dict' or 'module'"
)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


class CheckpointError(ConfigError):
    """A weight file cannot be used: missing, unreadable, damaged, or not weights."""


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksum(path: Path, digest: str | None = None) -> None:
    """Write ``<path>.sha256`` atomically (``sha256sum`` format)."""
    digest = digest or file_sha256(path)
    target = checksum_path(path)
    tmp = temp_path(target)
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, target)


def checksum_problem(path: Path) -> str | None:
    """Why ``path`` does not match its checksum file; None if it matches or has none."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text().split()
    expected = fields[0].lower() if fields else ""
    actual = file_sha256(path)
    if actual == expected:
        return None
    return f"its sha256 is {actual}, but {sidecar} says {expected or '(nothing)'}"


def checksum_matches(path: Path) -> bool:
    """Whether ``path`` exists with a checksum beside it that it matches (a lock-free fast path)."""
    try:
        return path.is_file() and checksum_path(path).is_file() and checksum_problem(path) is None
    except OSError:
        return False


def save_artefact(obj: Any, path: Path) -> None:
    """Save ``obj`` with ``torch.save`` so that no reader ever sees a half-written or unchecked file.

    Written to a temporary file beside ``path`` (synced), renamed over ``path``, then its checksum
    is written. A crash between the two leaves a file without a checksum, which
    :func:`reuse_cached` handles like a file of an older version.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    remove_stale_temps(path)  # left by writes that were killed before their rename
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_checksum(path, hashlib.sha256(data).hexdigest())


def adopt_legacy(path: Path, legacy: Path, artefact: str) -> bool:
    """Give a cached artefact named by an older identity rule its current name, once, instead of
    training it again (``results/identity.py``: a folder data set once counted by its location).

    Args:
        path: the artefact's current name (a weights file, or a trained-method folder).
        legacy: its name under the older rule.
        artefact: the file whose checksum must match (``path`` itself, or a file inside the folder).

    Returns:
        Whether it was adopted.
    """
    if path == legacy or path.exists() or not checksum_matches(legacy / artefact if artefact else legacy):
        return False
    try:
        os.replace(legacy, path)
    except OSError:  # another job adopted it first
        return False
    if not artefact:  # the checksum file names the file it checks
        checksum_path(legacy).unlink(missing_ok=True)
        write_checksum(path)
    log.info("cached %s adopted under its current identity: %s", legacy, path)
    return True


def load_weight_file(
    path: str | Path, source: str, trust_key: str | None = None, trust_pickle: bool = False
) -> Any:
    """The object in a weight file, loaded weights-only, or one :class:`CheckpointError` saying why not.

    The error replaces torch's rather than chaining it: the part of torch's message that describes
    the file is quoted, and the rest advises ``weights_only=False``, which is what not to do.

    ``source`` names the file in messages (``model.checkpoint=PATH``). ``trust_key`` is the config
    key that lets the user allow full unpickling of this file (None: no opt-in, as for cache
    files); ``trust_pickle`` is its value.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{source}: no such file; {EXPECTED}")
    if not path.is_file():
        raise CheckpointError(f"{source} is not a file; {EXPECTED}")
    try:
        damage = checksum_problem(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        raise CheckpointError(f"{source} cannot be read: {err}") from None
    if damage:
        raise CheckpointError(
            f"{source} is damaged (or was changed after its checksum was written): {damage}"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            message = f"{source} is not a readable .safetensors file ({err}); {EXPECTED}"
            raise CheckpointError(message) from None
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path, err)
        if not unsafe:
            raise CheckpointError(f"{source} {_unreadable(head, err)}; {EXPECTED}") from None
        if not trust_pickle or trust_key is None:
            raise CheckpointError(_refusal(source, unsafe, trust_key)) from None
    except Exception as err:  # torch raises KeyError, EOFError, RuntimeError... for damaged files
        raise CheckpointError(f"{source} {_unreadable(head, err)}; {EXPECTED}") from None
    log.warning("%s pickles Python objects (%s); fully unpickled because %s=true", source, unsafe, trust_key)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{source} {_unreadable(head, err)}; {EXPECTED}") from None


def reuse_cached(path: Path, what: str, expect_keys: Sequence[str], remove_damaged: bool = True) -> bool:
    """Whether the cache file ``path`` can be used; call it holding the cache entry's lock.

    A file whose checksum matches is used. One without a checksum (written by an older version,
    or by a job killed between rename and checksum) is used if it loads weights-only as a dict
    with ``expect_keys``, and gets its checksum now. Anything else is damaged: a warning names it
    and, if ``remove_damaged``, it is deleted so that the caller rebuilds it.
    """
    remove_stale_temps(path)
    if not path.exists():
        return False
    try:
        if checksum_path(path).is_file():
            problem = checksum_problem(path)
        else:
            obj = load_weight_file(path, f"{what} {path}")
            missing = [k for k in expect_keys if not (isinstance(obj, dict) and k in obj)]
            problem = f"it holds no {missing}" if missing else None
            if problem is None:
                write_checksum(path)
                log.info("%s %s had no checksum (older version) and loads: checksum added", what, path)
    except (OSError, CheckpointError) as err:
        problem = str(err)
    if problem is None:
        return True
    log.warning("%s %s is damaged: %s", what, path, problem)
    if remove_damaged:
        log.warning("deleting %s so that it is rebuilt", path)
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
    return False


def _unsafe_globals(path: Path, err: pickle.UnpicklingError) -> list[str]:
    """The Python objects the file's pickle would build, read from its opcodes (nothing is run).

    torch reads them from a zip checkpoint; for the legacy (pre-1.6, not zipped) format only
    torch's error names one, the first it met.
    """
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint, or a damaged one
        names = re.findall(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module)", str(err))
    return [n for n in names if n not in allowed]


def _refusal(source: str, unsafe: list[str], trust_key: str | None) -> str:
    shown = ", ".join(unsafe[:5]) + (f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else "")
    text = (
        f"{source} pickles Python objects besides tensors ({shown}); loading them could run code from "
        f"the file, so it is refused. "
    )
    if trust_key is None:
        return text + "This framework never writes such a file: delete it and run again."
    return text + (
        f"If you trust the file (an official training checkpoint, say), set {trust_key}=true, or convert "
        f"it once to a plain state dict or .safetensors (docs/getting-started.md#first-run)."
    )


def _unreadable(head: bytes, err: BaseException) -> str:
    """What a file torch could not load looks like, from its first bytes and torch's error."""
    lines = [line.strip() for line in f"{type(err).__name__}: {err}".splitlines() if line.strip()]
    detail = next((line for line in lines if "error" in line.lower()), lines[0])[:300]
    if not head:
        return "is empty"
    if head.startswith(_ZIP_MAGIC):
        return f"is a zip archive that torch cannot read: truncated or damaged? (torch: {detail})"
    if head.startswith(_PICKLE_PROTO):
        return f"is a pickle that torch cannot read: truncated or damaged? (torch: {detail})"
    return f"is neither a torch.save zip archive nor a pickle (it starts with {head[:8]!r})"
