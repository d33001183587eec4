"""Training: the accelerate-driven loop, EMA, the resumable data order and atomic checkpoints."""

from ..checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                         load_checkpoint_files, resolve_checkpoint, save_checkpoint)
from .ema import create_ema, ema_decay_at, update_ema
from .loop import SetupError, TrainResult, capture_rng, config_from_checkpoint, restore_rng, train

__all__ = ["CheckpointError", "SetupError", "TrainResult", "capture_rng", "config_from_checkpoint",
           "create_ema", "ema_decay_at", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint_files", "resolve_checkpoint", "restore_rng", "save_checkpoint", "train",
           "update_ema"]
