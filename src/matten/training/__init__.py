"""Training: the accelerate-driven loop, EMA and the resumable data order (checkpoints are
:mod:`matten.checkpoint`)."""

from .ema import create_ema, ema_decay_at, update_ema
from .loop import SetupError, TrainResult, capture_rng, restore_rng, train

__all__ = ["SetupError", "TrainResult", "capture_rng", "create_ema", "ema_decay_at",
           "restore_rng", "train", "update_ema"]
