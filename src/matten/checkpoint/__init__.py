"""Checkpoints: the on-disk format (written atomically, read with safe loaders) and loading a
trained model back for inference."""

from .files import (
    CHECKPOINTS_DIR,
    EMA_FILE,
    FILES,
    META_FILE,
    MODEL_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_files,
    load_weights,
    prune_checkpoints,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
    state_dict_to_safetensors,
    step_dirname,
)
from .loading import LoadedModel, config_from_checkpoint, load_for_sampling

__all__ = [
    "CHECKPOINTS_DIR",
    "EMA_FILE",
    "FILES",
    "META_FILE",
    "MODEL_FILE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_files",
    "load_weights",
    "prune_checkpoints",
    "read_meta",
    "resolve_checkpoint",
    "save_checkpoint",
    "state_dict_to_safetensors",
    "step_dirname",
    "LoadedModel",
    "config_from_checkpoint",
    "load_for_sampling",
]
