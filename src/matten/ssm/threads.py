"""One thread budget for torch and the compiled CPU kernels.

torch and numba each keep a pool of worker threads, and they are two different OpenMP runtimes
(torch ships its own libgomp; numba's pool links the system's). Two rules keep them from
fighting over the cores:

* the kernels run on as many threads as torch is set to use (``torch.set_num_threads``,
  ``OMP_NUM_THREADS``), never more than numba's own limit (``NUMBA_NUM_THREADS``), so the
  process never asks for twice the cores it has;
* numba's waiting threads sleep instead of spinning. libgomp's workers spin for a while after
  each parallel region; numba's would then spin through the torch ops that follow a kernel and
  take a core from them. The kernels are launched a few dozen times a step, each launch running
  for milliseconds, so waking sleeping threads costs nothing that shows, while torch's own pool
  keeps its default (its ops are many and short). A policy the user set (``OMP_WAIT_POLICY``)
  applies to both pools, as before.

numba's pool and torch's share one libgomp in the same process (the soname is loaded once), and
starting numba's pool sets that runtime's thread count to ``NUMBA_NUM_THREADS``: a process told
``OMP_NUM_THREADS=1`` would run torch on every core after its first kernel. Starting the pool
therefore puts torch's count back as it was.
"""

from __future__ import annotations

import os
import threading

import numba
import torch

_pool_started = False
_pool_lock = threading.Lock()  # two streams (threads) may launch their first kernel together


def _start_pool() -> None:
    """Start numba's thread pool with libgomp's passive wait policy, unless the user chose one.

    libgomp reads OMP_WAIT_POLICY once, when it is loaded, and numba loads its OpenMP pool on
    first use: so the variable is set just for that moment. torch's libgomp was loaded (and read
    the environment) when torch was imported, so it is not affected."""
    global _pool_started
    if _pool_started:
        return
    with _pool_lock:
        if _pool_started:
            return
        chosen = "OMP_WAIT_POLICY" in os.environ
        torch_threads = torch.get_num_threads()
        if not chosen:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            numba.get_num_threads()  # loads and starts the pool
        finally:
            if not chosen:
                os.environ.pop("OMP_WAIT_POLICY", None)
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
        _pool_started = True


def kernel_threads() -> int:
    """How many threads the compiled kernels may use now: torch's count, within numba's limit."""
    limit = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at import time
    return max(1, min(torch.get_num_threads(), limit))


def follow_torch() -> int:
    """Set numba's thread count (for launches from this thread) to :func:`kernel_threads`."""
    _start_pool()
    n = kernel_threads()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n
