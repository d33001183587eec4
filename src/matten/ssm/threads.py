"""One thread budget for torch and the compiled CPU kernels.

torch and numba each keep a pool of worker threads. If each sized its pool to the machine, a
numba kernel launched between two torch ops would run its threads while torch's are still
waiting for work, and the process would ask for twice the cores it has. So the kernels run on
as many threads as torch is set to use (``torch.set_num_threads``, ``OMP_NUM_THREADS``), never
more than numba's own limit (``NUMBA_NUM_THREADS``).
"""

from __future__ import annotations

import numba
import torch


def kernel_threads() -> int:
    """How many threads the compiled kernels may use now: torch's count, within numba's limit."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def follow_torch() -> int:
    """Set numba's thread count (for launches from this thread) to :func:`kernel_threads`."""
    n = kernel_threads()
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n
