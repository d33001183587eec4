"""The run configuration's schema: six sections of typed fields with their defaults.

A run config has six sections: ``model``, ``data``, ``autoencoder``, ``diffusion``, ``train`` and
``sample``; ``model`` nests the long-video backbone's options in ``model.causal``. Reading YAML
and ``key=value`` overrides is :mod:`.loader`; the checks a type alone cannot make are
:mod:`.validation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .validation import ConfigError, validate

__all__ = [
    "ModelConfig",
    "CausalConfig",
    "DataConfig",
    "AutoencoderConfig",
    "DiffusionConfig",
    "TrainConfig",
    "SampleConfig",
    "RunConfig",
    "ConfigError",
    "SECTIONS",
]


@dataclass
class CausalConfig:
    """Options of the long-video backbone, Matten-Causal (``model.causal.*``; the clip models
    ignore them)."""

    window: int = 8  # frames of the sliding attention window
    sink: int = 1  # first frames always attended to
    memory: str = "both"  # global memory: "ssm", "delta", "both" or "none", each optionally
    # with MALT's segment memory: "malt", "malt+ssm", "malt+delta", "malt+both"
    num_actions: int = 0  # discrete per-frame actions (0: none)
    ssm_block_size: int | list = 2  # SSM blocks in tokens: n, [b_h, b_w] or one per layer
    window_kind: str = "same_position"  # the window: "same_position" or "frame_local"
    malt_slots: int = 16  # "malt": memory vectors per layer (fixed, never grows)
    malt_segment: int = 4  # "malt": frames per memory write
    action_dropout_prob: float = 0.0  # each frame's action -> the null action, with this
    # probability in training (> 0: guidance on actions, sample.action_cfg_scale, can be used)


@dataclass
class ModelConfig:
    """The backbone. Options every family reads, the clip models' own (``variant``,
    ``conditioning``, ``gradient_checkpointing``, the paper's model, so they stay at the top),
    and the long-video backbone's in ``causal``."""

    name: str = "Matten-S/2"  # Matten-S/B/L/XL/2, Latte-S/B/L/XL/2 (the attention baseline) or
    # Matten-Causal (the long-video backbone, options in `causal` below)
    variant: int = 3  # Matten variants 1-4 (paper Sec. 3.2); ignored by Latte
    conditioning: str = "adan"  # "adan" (M-AdaN / adaLN-Zero) or "tokens" (conditional tokens)
    num_classes: int | None = None  # None: the dataset's class count (0 = unconditional)
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    learn_sigma: bool = True
    depth: int | None = None  # overrides of the size's depth / hidden size / heads
    hidden_size: int | None = None
    num_heads: int | None = None
    gradient_checkpointing: bool = False
    causal: CausalConfig = field(default_factory=CausalConfig)


@dataclass
class DataConfig:
    name: str = "synthetic"  # ucf101, sky_timelapse, faceforensics, taichi_hd, folder, synthetic
    root: str | None = None  # dataset folder (not used by "synthetic")
    resolution: int = 32
    num_frames: int = 16
    frame_stride: int = 3
    split: str | None = None  # e.g. "train" for the benchmark layouts
    num_videos: int = 512  # synthetic set only
    num_classes: int = 4  # synthetic set only: number of motion classes (0 = unlabelled)
    hflip: float = 0.5  # horizontal flip probability (video datasets)
    num_workers: int = 0  # DataLoader workers
    options: dict = field(default_factory=dict)  # extra keyword arguments of the dataset


@dataclass
class AutoencoderConfig:
    kind: str = "pixel"  # "pixel" (identity) or "sd-vae" (Stable Diffusion v1-4 VAE)
    path: str | None = None  # sd-vae: local folder or .safetensors file (never downloaded)
    frame_batch_size: int = 16  # frames per VAE call


@dataclass
class DiffusionConfig:
    steps: int = 1000  # diffusion steps of the training chain
    timestep_respacing: str = ""  # training respacing ("" keeps all steps)
    prediction: str = "eps"  # what the model predicts: "eps" (the paper) or "velocity"
    schedule: str = "linear"  # noise schedule: "linear" (the paper) or "cosine" (IDDPM)
    loss_weighting: str = "uniform"  # L_simple per noise level: "uniform" or "min_snr"
    min_snr_gamma: float = 5.0  # "min_snr": the SNR at which the weight stops growing
    forcing: bool = False  # diffusion forcing: an independent noise level per frame
    history_prob: float = 0.0  # forcing: chance a clip's first frames are clean history (no loss)
    context_noise: float = 0.0  # forcing: history frames get a level up to this fraction of
    # the steps instead of 0, so generation tolerates its own errors (0: clean history)


@dataclass
class TrainConfig:
    output: str | None = None  # run folder (the --output option)
    batch_size: int = 8  # global batch, split over the processes
    max_steps: int = 1000
    # short to long clips: stages [steps, num_frames] or [steps, num_frames, batch_size]; the
    # last runs on to max_steps; no batch size: frames x batch kept (empty: off)
    curriculum: list = field(default_factory=list)
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0  # max gradient norm; null disables clipping
    ema_decay: float = 0.9999
    ema_early_decay: float | None = None  # decay used for the first ema_early_steps steps
    ema_early_steps: int = 0
    mixed_precision: str = "auto"  # "no", "bf16", "fp16"; "auto": bf16 on CUDA if supported
    seed: int = 0
    log_every: int = 10  # steps between loss records
    checkpoint_every: int = 1000
    keep_last: int = 3  # checkpoints kept (older ones are deleted); 0 keeps all
    sample_every: int = 0  # steps between sample videos (0: only at the end)
    cpu: bool = False  # train on the CPU even if a GPU is present
    deterministic: bool = False  # deterministic GPU kernels (exact resume on CUDA; slower)
    memory_reg_weight: float = 0.0  # MALT memory: weight of the slots' redundancy penalty
    # minus diversity reward, added to the loss (0: off; needs model.causal.memory malt...)


@dataclass
class SampleConfig:
    num_samples: int = 8
    sampler: str = "ddim"  # "ddpm" or "ddim"
    steps: int | None = None  # respaced steps; None: 250 (ddpm) / 50 (ddim)
    eta: float = 0.0
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = none)
    action_cfg_scale: float = 1.0  # guidance on per-frame actions (1 = none; needs a model
    # trained with model.causal.action_dropout_prob > 0)
    seed: int = 0
    fps: int = 8


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> RunConfig:
        """Check values that a type alone does not; returns self (see :mod:`.validation`)."""
        validate(self)
        return self


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}
