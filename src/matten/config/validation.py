"""The checks a field's type cannot make, done once, when a config is loaded: ranges, and names
that must be among the ones the code that reads them knows (imported from there, not spelled
again here)."""

from __future__ import annotations

from ..diffusion import (
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    SAMPLERS,
    SCHEDULES,
    check_cfg_scale,
    check_eta,
)
from ..models import CAUSAL_NAME, CONDITIONING_MODES, LAYOUTS, MEMORY_KINDS, WINDOW_KINDS

__all__ = ["ConfigError", "validate", "MIXED_PRECISIONS"]

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")  # "auto": bf16 on a CUDA GPU that has it
VARIANTS = tuple(k for k in LAYOUTS if isinstance(k, int))


class ConfigError(ValueError):
    """A bad config file, key or value."""


def _one_of(key: str, value, allowed) -> list[str]:
    if value in allowed:
        return []
    return [f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}"]


def _passes(key: str, check, value) -> list[str]:
    try:
        check(value)
    except ValueError as exc:
        return [f"{key}: {exc}"]
    return []


def _causal_problems(c) -> list[str]:
    """The long-video backbone's options, ``model.causal``."""
    problems = _one_of("model.causal.memory", c.memory, MEMORY_KINDS)
    problems += _one_of("model.causal.window_kind", c.window_kind, WINDOW_KINDS)
    if c.malt_slots < 1 or c.malt_segment < 1:
        problems.append("model.causal.malt_slots and model.causal.malt_segment must be >= 1")
    if c.window < 1 or c.sink < 0 or c.num_actions < 0:
        problems.append(
            "model.causal.window must be >= 1, model.causal.sink and model.causal.num_actions >= 0"
        )
    if not 0.0 <= c.action_dropout_prob < 1.0 or (c.action_dropout_prob > 0 and not c.num_actions):
        problems.append(
            "model.causal.action_dropout_prob must be in [0, 1), and above 0 only with "
            "model.causal.num_actions"
        )
    block = c.ssm_block_size
    if not (isinstance(block, int) and block >= 1 or isinstance(block, list) and block):
        problems.append(
            f"model.causal.ssm_block_size must be a positive int, [b_h, b_w] or a "
            f"list of per-layer sizes, got {block!r}"
        )
    return problems


def _memory_reg_problems(m, weight: float) -> list[str]:
    """``train.memory_reg_weight`` regularises MALT's memory: a model without one has none."""
    if weight < 0:
        return ["train.memory_reg_weight must be >= 0"]
    if weight > 0 and not (m.name == CAUSAL_NAME and m.causal.memory.startswith("malt")):
        return [
            f"train.memory_reg_weight regularises the MALT memory: it needs model.name "
            f"{CAUSAL_NAME} with model.causal.memory malt, malt+ssm, malt+delta or "
            f"malt+both (got {m.name}, memory {m.causal.memory})"
        ]
    return []


def _curriculum_problems(curriculum) -> list[str]:
    """``train.curriculum``: a list of [steps, num_frames] or [steps, num_frames, batch_size]."""
    if not isinstance(curriculum, (list, tuple)):
        return [
            f"train.curriculum must be a list of stages [steps, num_frames] or [steps, "
            f"num_frames, batch_size], got {curriculum!r}"
        ]
    problems = []
    for i, stage in enumerate(curriculum):
        if not (
            isinstance(stage, (list, tuple))
            and len(stage) in (2, 3)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in stage)
        ):
            problems.append(
                f"train.curriculum[{i}] must be [steps, num_frames] or [steps, "
                f"num_frames, batch_size] (integers), got {stage!r}"
            )
        elif stage[0] < 1 or stage[1] < 2 or (len(stage) == 3 and stage[2] < 1):
            problems.append(
                f"train.curriculum[{i}] = {list(stage)}: steps and batch_size must "
                "be >= 1 and num_frames >= 2"
            )
    return problems


def validate(cfg) -> None:
    """Raise :class:`ConfigError` listing every problem of the run config ``cfg``."""
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.sample
    problems = _one_of("model.conditioning", m.conditioning, CONDITIONING_MODES)
    problems += _one_of("model.variant", m.variant, VARIANTS)
    problems += _causal_problems(m.causal)
    if m.num_classes is not None and m.num_classes < 0:
        problems.append("model.num_classes must be >= 0 (or null for the dataset's count)")
    if not 0.0 <= m.class_dropout_prob < 1.0:
        problems.append("model.class_dropout_prob must be in [0, 1)")
    for key in ("resolution", "num_frames", "frame_stride", "num_videos"):
        if getattr(d, key) < 1:
            problems.append(f"data.{key} must be >= 1")
    if not 0.0 <= d.hflip <= 1.0:
        problems.append("data.hflip must be in [0, 1]")
    if d.num_workers < 0:
        problems.append("data.num_workers must be >= 0")
    if cfg.autoencoder.frame_batch_size < 1:
        problems.append("autoencoder.frame_batch_size must be >= 1")
    problems += _one_of("diffusion.prediction", cfg.diffusion.prediction, PREDICTIONS)
    problems += _one_of("diffusion.schedule", cfg.diffusion.schedule, SCHEDULES)
    problems += _one_of("diffusion.loss_weighting", cfg.diffusion.loss_weighting, LOSS_WEIGHTINGS)
    if not cfg.diffusion.min_snr_gamma > 0:
        problems.append("diffusion.min_snr_gamma must be > 0")
    if not 0.0 <= cfg.diffusion.history_prob <= 1.0:
        problems.append("diffusion.history_prob must be in [0, 1]")
    if cfg.diffusion.history_prob > 0 and not cfg.diffusion.forcing:
        problems.append("diffusion.history_prob needs diffusion.forcing: true")
    if not 0.0 <= cfg.diffusion.context_noise < 1.0:
        problems.append("diffusion.context_noise must be in [0, 1)")
    if cfg.diffusion.context_noise > 0 and cfg.diffusion.history_prob == 0:
        problems.append(
            "diffusion.context_noise noises the history frames: it needs "
            "diffusion.history_prob > 0 (and diffusion.forcing: true)"
        )
    for key in ("batch_size", "max_steps", "log_every", "checkpoint_every"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key} must be >= 1")
    if t.keep_last < 0 or t.sample_every < 0 or t.ema_early_steps < 0:
        problems.append(
            "train.keep_last, train.sample_every and train.ema_early_steps must be >= 0"
        )
    if t.lr <= 0:
        problems.append("train.lr must be > 0")
    for key in ("ema_decay", "ema_early_decay"):
        value = getattr(t, key)
        if value is not None and not 0.0 <= value <= 1.0:
            problems.append(f"train.{key} must be in [0, 1]")
    if t.grad_clip is not None and t.grad_clip <= 0:
        problems.append("train.grad_clip must be > 0 (or null to disable clipping)")
    problems += _one_of("train.mixed_precision", t.mixed_precision, MIXED_PRECISIONS)
    problems += _memory_reg_problems(m, t.memory_reg_weight)
    problems += _curriculum_problems(t.curriculum)
    problems += _one_of("sample.sampler", s.sampler, SAMPLERS)
    if s.num_samples < 1 or (s.steps is not None and s.steps < 1) or s.fps < 1:
        problems.append("sample.num_samples, sample.steps and sample.fps must be >= 1")
    problems += _passes("sample.eta", check_eta, s.eta)
    problems += _passes("sample.cfg_scale", check_cfg_scale, s.cfg_scale)
    problems += _passes("sample.action_cfg_scale", check_cfg_scale, s.action_cfg_scale)
    if s.action_cfg_scale != 1 and not m.causal.action_dropout_prob:
        problems.append(
            "sample.action_cfg_scale other than 1 needs model.causal.action_dropout_prob > 0 "
            "(guidance on actions contrasts them with the null action the dropout trains)"
        )
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
