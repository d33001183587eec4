"""Matten: video generation with Mamba-Attention latent diffusion."""

import os as _os

__version__ = "0.1.0"

# MATTEN_SHARED_CPU=1: threads that wait for work sleep instead of spinning, so that processes
# sharing the cores (two trainings, a training and `matten eval`) each keep half of the machine
# instead of starving each other. It is not the default: alone, a process is then about twice
# as slow (measured in bench/contention.py). libgomp reads OMP_WAIT_POLICY once, when torch
# loads it, so it is set here, before torch is imported; a value the user set is kept.
if _os.environ.get("MATTEN_SHARED_CPU", "0") == "1":
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
