"""The thread budget: the compiled scan kernels follow torch's thread count, and importing matten
makes waiting OpenMP threads sleep unless the user chose otherwise."""

import os
import subprocess
import sys

import numba
import pytest
import torch

from matten.ssm import selective_scan
from matten.ssm.threads import kernel_threads


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="numba has a single thread here")
def test_scan_kernels_run_on_torchs_thread_count():
    before_torch, before_numba = torch.get_num_threads(), numba.get_num_threads()
    try:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        torch.set_num_threads(1)
        assert kernel_threads() == 1
        u = torch.randn(2, 4, 9)
        selective_scan(
            u, u.abs(), -torch.ones(4, 3), torch.randn(2, 3, 9), torch.randn(2, 3, 9), backend="cpu"
        )
        assert numba.get_num_threads() == 1
        torch.set_num_threads(2)
        assert kernel_threads() == 2
    finally:
        torch.set_num_threads(before_torch)
        numba.set_num_threads(before_numba)


def test_kernel_threads_stay_within_numbas_limit():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(numba.config.NUMBA_NUM_THREADS + 3)
        assert kernel_threads() == numba.config.NUMBA_NUM_THREADS
    finally:
        torch.set_num_threads(before)


def wait_policy_after_import(**env) -> str | None:
    """OMP_WAIT_POLICY as a fresh ``import matten`` leaves it, under ``env``."""
    base = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MATTEN_SHARED_CPU")
    }
    code = "import os, matten; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return None if out == "None" else out


def test_shared_cpu_makes_waiting_threads_passive_and_keeps_the_user_s_choice():
    assert wait_policy_after_import() is None  # alone, spinning briefly is twice as fast
    assert wait_policy_after_import(MATTEN_SHARED_CPU="1") == "PASSIVE"
    assert wait_policy_after_import(MATTEN_SHARED_CPU="1", OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_starting_the_kernels_pool_keeps_the_users_torch_thread_count():
    """numba's OpenMP pool shares libgomp with torch; starting it used to reset torch to
    NUMBA_NUM_THREADS threads, so OMP_NUM_THREADS=1 ran on every core after the first kernel."""
    code = (
        "import torch, numba\n"
        "from matten.ssm import selective_scan\n"
        "u = torch.randn(2, 4, 9)\n"
        "selective_scan(u, u.abs(), -torch.ones(4, 3), torch.randn(2, 3, 9),"
        " torch.randn(2, 3, 9), backend='cpu')\n"
        "print(torch.get_num_threads(), numba.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out == ["1", "1"]
