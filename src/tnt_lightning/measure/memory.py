"""Process-wide memory setting, applied as every job starts (``run_task``): keep freed memory for reuse.

glibc's malloc returns large blocks to the kernel when they are freed (above a threshold that it
moves by itself), so the next allocation of that size faults its pages in again, zeroed. A
training or timing loop frees and reallocates the same large activations every pass; in a long
process, such as a sweep whose jobs all run in one (Hydra's basic launcher), this grew with the
process's age: the embedded study's sweep process spent a third of its CPU time in the kernel at
about 195 000 minor page faults a second (docs/design-notes.md#memory). With the mmap threshold fixed
at glibc's maximum and no trimming, freed memory stays in the process and is reused, as PyTorch's
own allocator does on GPUs; the process keeps its peak footprint. ``TNT_MALLOC=default`` leaves
glibc's behaviour; elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: larger blocks are mmapped
NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse; False where it cannot, or with ``TNT_MALLOC=default``."""
    if os.environ.get("TNT_MALLOC", "keep") == "default":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
