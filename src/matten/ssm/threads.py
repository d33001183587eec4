"""One thread budget for torch and the compiled CPU kernels.

numba's OpenMP thread pool runs on the libgomp torch loaded (its parallel regions bind to
torch's copy), so the kernels and torch's ops share one set of worker threads, and one wait
policy: the one in force when torch was imported (``OMP_WAIT_POLICY``, or ``MATTEN_SHARED_CPU=1``,
which ``import matten`` turns into ``PASSIVE`` when torch is not loaded yet). Two rules keep the
budget one:

* the kernels run on as many threads as torch is set to use (``torch.set_num_threads``,
  ``OMP_NUM_THREADS``), never more than numba's own limit (``NUMBA_NUM_THREADS``), and before a
  launch torch's count in the launching thread is brought to this process's share of the
  machine beside other busy processes (:mod:`matten.cpu_share`, looked at once a second);
* starting numba's pool sets the shared runtime's thread count to ``NUMBA_NUM_THREADS``, which
  would make a process told ``OMP_NUM_THREADS=1`` run torch on every core after its first
  kernel: starting the pool puts torch's count back as it was.
"""

from __future__ import annotations

import threading

import numba
import torch

from .. import cpu_share

_pool_started = False
_pool_lock = threading.Lock()  # two streams (threads) may launch their first kernel together


def _start_pool() -> None:
    """Start numba's thread pool (on first use), keeping torch's thread count."""
    global _pool_started
    if _pool_started:
        return
    with _pool_lock:
        if _pool_started:
            return
        torch_threads = torch.get_num_threads()
        try:
            numba.get_num_threads()  # loads and starts the pool
        finally:
            if torch.get_num_threads() != torch_threads:
                torch.set_num_threads(torch_threads)
        _pool_started = True


def kernel_threads() -> int:
    """How many threads the compiled kernels may use now: torch's count, within numba's limit."""
    limit = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at import time
    return max(1, min(torch.get_num_threads(), limit))


def follow_torch() -> int:
    """Set numba's thread count (for launches from this thread) to :func:`kernel_threads`,
    after torch's count has been brought to this process's share of the machine
    (:mod:`matten.cpu_share`)."""
    cpu_share.update()
    _start_pool()
    n = kernel_threads()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n
