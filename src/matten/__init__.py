"""Matten: video generation with Mamba-Attention latent diffusion."""

import os as _os

__version__ = "0.1.0"

# Threads that wait for work sleep instead of spinning (libgomp's default spins for a while,
# which starves a second process on the same cores, or torch's own next op). libgomp reads this
# once, when torch loads it, so it is set here, before torch is imported; a value the user set
# is kept, and MATTEN_THREAD_DEFAULTS=0 leaves the environment alone.
if _os.environ.get("MATTEN_THREAD_DEFAULTS", "1") != "0":
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
