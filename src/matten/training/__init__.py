"""Training: the accelerate-driven loop and its pieces (resume checks, the run builder, the
step, the callbacks that write), EMA, the resumable data order and the curriculum from short to
long clips. Checkpoints are :mod:`matten.checkpoint`."""

from .ema import create_ema, ema_decay_at, update_ema
from .loop import TrainResult, train
from .resume import SetupError
from .rng import capture_rng, restore_rng

__all__ = [
    "SetupError",
    "TrainResult",
    "capture_rng",
    "create_ema",
    "ema_decay_at",
    "restore_rng",
    "train",
    "update_ema",
]
