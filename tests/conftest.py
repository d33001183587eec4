"""Test-session settings."""

import os

# The suite's trainings compare runs bit for bit (resume, curriculum), and float sums depend on
# the thread count, which the core split (matten.cpu_share) changes when other processes are
# busy. The split is tested on its own, with explicit registries, in tests/test_cpu_share.py.
os.environ.setdefault("MATTEN_SPLIT_CORES", "0")
