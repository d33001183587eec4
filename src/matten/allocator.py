"""Keep freed memory for reuse: glibc's malloc tuned for a training loop's large tensors.

A CPU training step allocates and frees the same large activations every step. glibc serves
blocks above its mmap threshold (at most 32 MB once it has grown) with fresh ``mmap`` calls and
returns them with ``munmap`` when freed, and trims the heap's top whenever it is free; the next
step then takes the same memory from the kernel again, page fault by page fault, zeroed. On the
2-core CPU that is system time of the order of the step's own (bench/RESULTS.md, "Keeping freed
memory"). :func:`keep_freed_memory` raises the mmap threshold to its largest value, never trims
and pads the heap's growth, so a step reuses the previous step's pages. Resident memory then
stays at the run's high-water mark instead of falling between steps, which a training process
holds anyway.

It changes nothing when the user tuned malloc through its own environment variables, with
``MATTEN_KEEP_FREED_MEMORY=0``, or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["keep_freed_memory"]

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value (HEAP_MAX / 2 on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # never give the heap's top back
TOP_PAD = 512 * 2**20  # grow the heap in large steps: fewer brk calls and page-table updates

_USER_TUNING = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
)

_applied = False


def _glibc():
    """The running process's glibc, or None elsewhere (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Tune this process's malloc to keep freed memory (see the module's docstring).

    Returns whether the tuning is in effect. Calling it again is harmless.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("MATTEN_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in _USER_TUNING):
        return False  # the user's own malloc settings win
    libc = _glibc()
    if libc is None:
        return False
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    results = [libc.mallopt(param, value) == 1 for param, value in settings]  # each one tried
    _applied = all(results)
    return _applied
