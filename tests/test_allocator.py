"""Keeping freed memory (matten.allocator): large blocks come from the heap and stay there.

malloc's settings hold for a whole process, so each case runs in a fresh interpreter, which
reports whether the tuning applied, how many of 40 blocks of 16 MB were served by their own
mmap (glibc's mallinfo2: ``hblks`` counts such blocks) and whether the heap kept their memory
once freed (``arena``: the heap's size). malloc does not touch the pages: nothing is resident.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc's malloc only"
)

PROBE = """
import ctypes, json
from matten.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_memory()
again = keep_freed_memory()
before = libc.mallinfo2().hblks
blocks = [libc.malloc(16 * 2**20) for _ in range(40)]  # 640 MB, beyond any top pad
mmapped = libc.mallinfo2().hblks - before
heap = libc.mallinfo2().arena
for block in blocks:
    libc.free(block)
# after the frees: does the heap keep the blocks' memory (no trim back to the system)?
kept = heap >= 40 * 16 * 2**20 and libc.mallinfo2().arena == heap
print(json.dumps({"applied": applied, "again": again, "mmapped": mmapped, "kept": kept}))
"""


def probe(**env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    clean.pop("MATTEN_KEEP_FREED_MEMORY", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_large_blocks_come_from_the_heap_and_stay_after_free():
    result = probe()
    assert result == {"applied": True, "again": True, "mmapped": 0, "kept": True}


def test_untuned_malloc_maps_large_blocks_of_their_own():
    # the baseline the tuning changes: MATTEN_KEEP_FREED_MEMORY=0 leaves glibc's defaults
    result = probe(MATTEN_KEEP_FREED_MEMORY="0")
    assert result == {"applied": False, "again": False, "mmapped": 40, "kept": False}


def test_the_users_own_malloc_settings_win():
    result = probe(MALLOC_MMAP_THRESHOLD_="65536")
    assert result["applied"] is False and result["mmapped"] == 40


def test_a_cpu_training_run_keeps_freed_memory(tmp_path, monkeypatch):
    from test_train import tiny_config  # the tiny run the training tests share

    from matten import allocator
    from matten.training import train

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    train(tiny_config("train.max_steps=1"), output=tmp_path / "run", progress=False)
    assert calls == [1]
