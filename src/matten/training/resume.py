"""Starting a run or resuming one: which checkpoint to continue from, and what a resume may and
may not change."""

from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint import Checkpoint, latest_checkpoint, list_checkpoints, load_checkpoint_files
from ..config import ConfigError, RunConfig, config_differences, config_from_dict
from ..models.causal import layer_block_sizes

__all__ = ["SetupError", "NothingToTrain", "checkpoint_to_resume", "check_same_model"]

logger = logging.getLogger(__name__)

# The model's constructor arguments a resumed run must keep (its weights have their shapes).
MODEL_KEYS = (
    "name",
    "variant",
    "conditioning",
    "num_frames",
    "input_size",
    "in_channels",
    "num_classes",
    "learn_sigma",
    "depth",
    "hidden_size",
    "num_heads",
    "window",
    "sink",
    "memory",
    "num_actions",
    "ssm_block_size",
    "window_kind",
    "malt_slots",
    "malt_segment",
    "action_dropout_prob",
)
# Model options added after checkpoints were written: an older checkpoint had their default.
ADDED_LATER = {
    "window_kind": "same_position",
    "malt_slots": 16,
    "malt_segment": 4,
    "action_dropout_prob": 0.0,
}
# Settings whose change on resume would change what the trained weights mean (the model's output
# is read as another quantity, or its inputs live in another space): refused.
MEANING_KEYS = (
    "diffusion.prediction",
    "diffusion.steps",
    "diffusion.schedule",
    "model.learn_sigma",
    "autoencoder.kind",
)
# Settings that are expected to change on resume: not worth a warning.
RESUME_FREE_KEYS = ("train.max_steps", "train.output")


class SetupError(ValueError):
    """The run cannot start: bad data path, mismatched checkpoint, existing run folder, ..."""


class NothingToTrain(Exception):
    """The run to resume is at ``train.max_steps`` already (``checkpoint`` is where it stands)."""

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(f"the run is at step {checkpoint.step} = train.max_steps")
        self.checkpoint = checkpoint


def checkpoint_to_resume(cfg: RunConfig, output: Path, resume: str | None) -> Checkpoint | None:
    """The checkpoint a run continues from (None: a new run), after every check that needs no
    model: a new run must not overwrite one, a resume must not change what the weights mean and
    must have steps left to train (else :class:`NothingToTrain`)."""
    if resume is None:
        if list_checkpoints(output):
            raise SetupError(
                f"'{output}' already holds checkpoints; pass --resume to continue "
                "that run or choose another --output"
            )
        return None
    found = latest_checkpoint(output) if resume == "auto" else resume
    if found is None:
        return None
    checkpoint = load_checkpoint_files(found)
    _check_resume_settings(checkpoint.meta.get("run_config", {}), cfg, checkpoint.folder)
    done = checkpoint.step
    if cfg.train.max_steps < done:
        raise SetupError(
            f"the run is already at step {done}, past train.max_steps="
            f"{cfg.train.max_steps}: pass --max-steps above {done} to train "
            "further (an earlier checkpoint can be sampled with --checkpoint "
            f"{checkpoint.folder.parent}/step_XXXXXXX)"
        )
    if cfg.train.max_steps == done:
        logger.info(
            "nothing left to train: the run is at step %d = train.max_steps; pass "
            "--max-steps N (N > %d) to train longer",
            done,
            done,
        )
        raise NothingToTrain(checkpoint)
    return checkpoint


def _check_resume_settings(saved: dict, cfg: RunConfig, where: Path) -> None:
    """Refuse a resume that changes what the weights mean; warn about every other change."""
    try:
        before = config_from_dict(saved)
    except ConfigError:
        return  # an older checkpoint's config: the model comparison still guards the weights
    changes = {
        k: v for k, v in config_differences(before, cfg).items() if k not in RESUME_FREE_KEYS
    }
    refused = [
        f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changes.items() if k in MEANING_KEYS
    ]
    if refused:
        raise SetupError(
            f"cannot resume from '{where}' with {'; '.join(refused)}: that changes "
            "what the trained weights mean; train a new run (another --output) "
            "for these settings"
        )
    if changes:
        logger.warning(
            "resuming with changed settings: %s",
            ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()),
        )


def check_same_model(saved: dict, built: dict, where: Path) -> None:
    """The model a resumed run builds must be the checkpoint's: the same constructor arguments."""
    saved = dict(saved)
    if saved.get("ssm_block_size") is not None and saved.get("depth"):
        # older checkpoints hold one (b_h, b_w) for all layers; compare per layer
        saved["ssm_block_size"] = [
            list(b) for b in layer_block_sizes(saved["ssm_block_size"], saved["depth"])
        ]
    for key, default in ADDED_LATER.items():  # checkpoints from before an option existed
        if key in built and key not in saved:
            saved[key] = default
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {built.get(k)!r}"
        for k in MODEL_KEYS
        if _compared(k, saved.get(k)) != _compared(k, built.get(k))
    ]
    if diffs:
        raise SetupError(f"cannot resume from '{where}': the model differs ({'; '.join(diffs)})")


def _compared(key, value):
    """What of a model option the weights depend on."""
    if key == "action_dropout_prob":  # only whether the null action's row exists
        return bool(value)
    return list(value) if isinstance(value, tuple) else value
