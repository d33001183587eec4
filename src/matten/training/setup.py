"""Everything a training run needs before its first step, built in one place: the accelerator,
the data and its resumable order, the frozen autoencoder, the model with its EMA and optimizer
(from the checkpoint when resuming), the diffusion, the random streams and what checkpoints
record about the run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from ..checkpoint import Checkpoint
from ..config import RunConfig, config_to_dict, resolve_mixed_precision
from ..data import dataset_from_config
from ..diffusion import GaussianDiffusion, create_diffusion
from ..latent import Autoencoder, build_autoencoder
from ..models import build_model, model_kwargs_for_run
from .data import StreamSampler, build_loader
from .ema import create_ema
from .resume import SetupError, check_same_model
from .rng import restore_rng, seed_everything

__all__ = ["Run", "build_run", "barrier", "any_process"]

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """A training run, ready to step. ``model`` is what accelerate wrapped (call it),
    ``raw_model`` the module itself (save it, inspect it)."""

    cfg: RunConfig
    output: Path
    accelerator: Accelerator
    dataset: object
    sampler: StreamSampler
    loader: object
    autoencoder: Autoencoder
    model: nn.Module
    raw_model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    diffusion: GaussianDiffusion
    start_step: int
    num_classes: int
    latent_hw: tuple[int, int]
    meta: dict  # what every checkpoint's checkpoint.json records beside the step

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def build_run(cfg: RunConfig, output: Path, checkpoint: Checkpoint | None) -> Run:
    """Build the run ``cfg`` describes, continuing ``checkpoint`` if given. Writes nothing."""
    accelerator = make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.train.batch_size % world:
        raise SetupError(
            f"train.batch_size {cfg.train.batch_size} is not divisible by the {world} processes"
        )
    # Same seed on every process for the model's initial weights...
    seed_everything(cfg.train.seed)
    dataset = build_dataset(cfg)
    autoencoder, latent_hw = build_frozen_autoencoder(cfg)
    autoencoder.to(accelerator.device)
    num_classes = model_num_classes(cfg, dataset)
    model = build_denoiser(cfg, autoencoder.latent_channels, latent_hw, num_classes)
    ema = create_ema(model)
    start_step, rng_states = 0, None
    if checkpoint is not None:
        check_same_model(
            checkpoint.meta.get("model_config", {}), dict(model.config), checkpoint.folder
        )
        model.load_state_dict(checkpoint.model)
        ema.load_state_dict(checkpoint.ema)
        start_step, rng_states = checkpoint.step, checkpoint.state.get("rng")
    model.to(accelerator.device)
    ema.to(accelerator.device)
    t = cfg.train
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
    )
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.state["optimizer"])
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    if checkpoint is not None and checkpoint.state.get("scaler") and accelerator.scaler:
        accelerator.scaler.load_state_dict(checkpoint.state["scaler"])
    # ... and a different stream per process for noise, timesteps and label dropout.
    if rng_states is not None and len(rng_states) == world:
        restore_rng(rng_states[rank])
    else:
        if rng_states is not None and accelerator.is_main_process:
            logger.warning(
                "the checkpoint was written by %d processes, this run has %d: the "
                "random streams are re-seeded, so the run will not match an "
                "uninterrupted one exactly",
                len(rng_states),
                world,
            )
        seed_everything(t.seed * 7919 + 1 + rank + start_step * 104729)
    sampler = StreamSampler(
        len(dataset), t.batch_size, rank, world, seed=t.seed, start=start_step * t.batch_size
    )
    loader = build_loader(
        dataset, sampler, cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda"
    )
    diffusion = create_diffusion(
        cfg.diffusion.timestep_respacing,
        cfg.diffusion.steps,
        learn_sigma=cfg.model.learn_sigma,
        prediction=cfg.diffusion.prediction,
        schedule=cfg.diffusion.schedule,
        loss_weighting=cfg.diffusion.loss_weighting,
        min_snr_gamma=cfg.diffusion.min_snr_gamma,
    )
    meta = checkpoint_meta(
        cfg,
        model,
        autoencoder,
        latent_hw,
        list(getattr(dataset, "class_names", []) or [])[:num_classes],
    )
    return Run(
        cfg,
        output,
        accelerator,
        dataset,
        sampler,
        loader,
        autoencoder,
        wrapped,
        accelerator.unwrap_model(wrapped),
        ema,
        optimizer,
        diffusion,
        start_step,
        num_classes,
        latent_hw,
        meta,
    )


def make_accelerator(cfg: RunConfig) -> Accelerator:
    if cfg.train.deterministic:
        # CPU kernels are deterministic already; on CUDA cuBLAS needs a fixed workspace and
        # atomics-based kernels must be avoided (a warning names any that has no alternative).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    precision = resolve_mixed_precision(cfg.train.mixed_precision, "cpu" if cpu else "cuda")
    if precision == "fp16" and cpu:
        raise SetupError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on the CPU")
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # accelerate keeps its settings process-wide; a second run in the same process (a
        # notebook, the tests) may use other ones. Launched runs keep the launcher's state.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=cpu, mixed_precision=precision)


def build_dataset(cfg: RunConfig):
    try:
        return dataset_from_config(cfg.data, seed=cfg.train.seed)
    except (ValueError, OSError) as exc:  # a missing root, a file where a folder is needed
        raise SetupError(f"data ({cfg.data.name}): {exc}") from exc
    except TypeError as exc:  # an unknown keyword in data.options
        raise SetupError(
            f"data ({cfg.data.name}): {exc} (check data.options: {cfg.data.options})"
        ) from exc


def build_frozen_autoencoder(cfg: RunConfig) -> tuple[Autoencoder, tuple[int, int]]:
    """The autoencoder and the latent size of a frame at ``data.resolution``."""
    kwargs = (
        {}
        if cfg.autoencoder.kind == "pixel"
        else {"frame_batch_size": cfg.autoencoder.frame_batch_size}
    )
    try:
        autoencoder = build_autoencoder(cfg.autoencoder.kind, cfg.autoencoder.path, **kwargs)
        return autoencoder, tuple(autoencoder.latent_size(cfg.data.resolution))
    except ValueError as exc:
        raise SetupError(f"autoencoder: {exc}") from exc


def build_denoiser(cfg: RunConfig, in_channels: int, latent_hw, num_classes: int) -> nn.Module:
    try:
        model = build_model(
            **model_kwargs_for_run(
                config_to_dict(cfg)["model"],
                in_channels=in_channels,
                latent_hw=latent_hw,
                num_classes=num_classes,
                num_frames=cfg.data.num_frames,
            )
        )
    except (ValueError, TypeError) as exc:
        raise SetupError(f"model: {exc}") from exc
    # The latent must split into whole patches: say which resolution works, before any file
    # is written (the model itself only finds out at its first forward pass).
    patch = int(getattr(model, "patch_size", 1))
    h, w = latent_hw
    if h % patch or w % patch:
        factor = max(1, cfg.data.resolution // h)
        raise SetupError(
            f"data.resolution={cfg.data.resolution} gives a {h}x{w} latent, which "
            f"the model's {patch}x{patch} patches do not divide: use a multiple of "
            f"{patch * factor}"
        )
    return model


def model_num_classes(cfg: RunConfig, dataset) -> int:
    data_classes = int(getattr(dataset, "num_classes", 0) or 0)
    wanted = cfg.model.num_classes
    if wanted is None:
        return data_classes
    if wanted > 0 and wanted != data_classes:
        raise SetupError(
            f"model.num_classes is {wanted} but the '{cfg.data.name}' data have "
            f"{data_classes} classes; set model.num_classes=null to use the data's "
            f"count or 0 for an unconditional model"
        )
    return wanted


def checkpoint_meta(cfg: RunConfig, model, autoencoder, latent_hw, class_names) -> dict:
    """What a checkpoint records so that sampling needs nothing else (checkpoint.json)."""
    return {
        "model_config": dict(model.config),
        "run_config": config_to_dict(cfg),
        "class_names": class_names,
        "diffusion_steps": cfg.diffusion.steps,
        "prediction": cfg.diffusion.prediction,
        "schedule": cfg.diffusion.schedule,
        "latent": {
            "channels": autoencoder.latent_channels,
            "size": list(latent_hw),
            "num_frames": cfg.data.num_frames,
        },
        "autoencoder": {
            "kind": autoencoder.kind,
            "path": cfg.autoencoder.path,
            "frame_batch_size": cfg.autoencoder.frame_batch_size,
        },
        "data": {"name": cfg.data.name, "resolution": cfg.data.resolution},
    }


def barrier(accelerator) -> None:
    """Wait for every process. CPU processes use a plain gloo barrier: accelerate's passes
    device_ids=[local rank], which fails on a machine with fewer GPUs than CPU processes."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        torch.distributed.barrier()
    else:
        accelerator.wait_for_everyone()


def any_process(flag: bool, accelerator) -> bool:
    """Whether ``flag`` is set on any process (all of them wait for this answer, so they take
    the same branch: stop at the same step, fail at the same checkpoint)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)
