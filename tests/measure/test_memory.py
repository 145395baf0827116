"""``keep_freed_memory`` (run.py's start-up): freed blocks are reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT

# A training step's pattern: 64 blocks of 512 KiB (activations) allocated, written, then all freed;
# prints the minor page faults of 10 repeats, after the first.
PROBE = """
import ctypes, resource, sys
sys.path.insert(0, {src!r})
from tnt_lightning.measure.memory import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 512 * 1024
def step():
    blocks = [libc.malloc(size) for _ in range(64)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(src=str(ROOT / "src"))],
        env={"TNT_MALLOC": mode, "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept, kept_faults = faults("keep")
    default, default_faults = faults("default")
    assert (kept, default) == ("True", "False")
    pages = 10 * 64 * 512 * 1024 // 4096
    assert default_faults > pages // 2  # glibc hands the freed blocks back and faults them in again
    assert kept_faults < pages // 100
