"""Sampling videos from a trained model: load a checkpoint, run DDPM or DDIM (with classifier-free
guidance for class-conditional models), decode the latents, write a video and a grid image."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import save_grid_image, video_to_uint8, write_video
from .diffusion import classifier_free_guidance, create_diffusion
from .latent import Autoencoder, PixelAutoencoder, build_autoencoder
from .checkpoint import (CheckpointError, load_weights, read_meta,
                                  resolve_checkpoint)

__all__ = ["SamplingError", "LoadedModel", "load_for_sampling", "default_steps", "sample_latents",
           "sample_videos", "resolve_labels", "clip_actions", "dataset_actions", "tile_videos",
           "upscale_frames", "save_samples", "grid_path_for", "action_names",
           "parse_action_schedule", "parse_class_switches", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")


class SamplingError(ValueError):
    """Bad sampling options (class out of range, guidance for an unconditional model, ...)."""


def default_steps(sampler: str) -> int:
    """250 respaced steps for DDPM, 50 for DDIM."""
    return 250 if sampler == "ddpm" else 50


@dataclass
class LoadedModel:
    model: nn.Module
    autoencoder: Autoencoder
    meta: dict
    folder: Path

    @property
    def num_classes(self) -> int:
        return int(self.meta["model_config"].get("num_classes") or 0)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def num_frames(self) -> int:
        return int(self.meta["latent"]["num_frames"])

    @property
    def latent_size(self) -> tuple[int, int]:
        h, w = self.meta["latent"]["size"]
        return int(h), int(w)

    @property
    def learn_sigma(self) -> bool:
        return bool(self.meta["model_config"].get("learn_sigma", True))

    @property
    def diffusion_steps(self) -> int:
        return int(self.meta.get("diffusion_steps", 1000))

    @property
    def prediction(self) -> str:
        return str(self.meta.get("prediction", "eps"))

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def load_for_sampling(path, weights: str = "ema", device="cpu", vae_path=None) -> LoadedModel:
    """Rebuild the model of a checkpoint (run folder, checkpoints folder or checkpoint folder)
    with its ``"ema"`` (default) or ``"model"`` weights, and its autoencoder."""
    from .models import build_model

    folder = resolve_checkpoint(path)
    meta = read_meta(folder)
    try:
        model = build_model(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot rebuild the model of '{folder}': {exc}") from None
    state = load_weights(folder, weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"the {weights} weights of '{folder}' do not fit its model: "
                              f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    model.to(device).eval().requires_grad_(False)
    ae_meta = dict(meta.get("autoencoder") or {"kind": "pixel"})
    kind = ae_meta.get("kind", "pixel")
    kwargs = {}
    if kind != "pixel":
        kwargs["frame_batch_size"] = int(ae_meta.get("frame_batch_size", 16))
    autoencoder = build_autoencoder(kind, vae_path if vae_path is not None
                                    else ae_meta.get("path"), **kwargs).to(device)
    return LoadedModel(model, autoencoder, meta, folder)


def clip_actions(dataset, num_samples: int) -> torch.Tensor | None:
    """The per-frame actions of the first ``num_samples`` clips of ``dataset`` (the camera moves
    of the panning-map set), for sampling an action-conditioned model; None if it has none."""
    if "actions" not in dataset[0]:
        return None
    return torch.stack([dataset[i % len(dataset)]["actions"] for i in range(num_samples)])


def dataset_actions(run_config: dict, num_samples: int) -> torch.Tensor | None:
    """:func:`clip_actions` of the data a run was trained on."""
    from .config import config_from_dict
    from .training.data import build_train_dataset

    return clip_actions(build_train_dataset(config_from_dict(run_config).data), num_samples)


def action_names(run_config: dict) -> tuple[str, ...]:
    """Names of the discrete actions of the data a run was trained on (empty if unnamed)."""
    if str(run_config.get("data", {}).get("name", "")).lower() == "panning_map":
        from .data import ACTION_NAMES
        return ACTION_NAMES
    return ()


def parse_action_schedule(spec: str, num_actions: int, names=()) -> list[int]:
    """``"right*8,stay,left*8"`` -> one action per frame: comma-separated actions (an index or
    a name), each optionally repeated ``*COUNT`` times. The list is cycled over the video."""
    lookup = {str(n).lower(): i for i, n in enumerate(names)}
    known = f" or one of {list(names)}" if names else ""
    schedule = []
    for item in str(spec).split(","):
        action, _, count = item.strip().partition("*")
        action = action.strip().lower()
        try:
            value = lookup[action] if action in lookup else int(action)
            repeat = int(count) if count.strip() else 1
        except ValueError:
            raise SamplingError(f"--actions item {item.strip()!r} must be ACTION or ACTION*COUNT "
                                f"with ACTION an index in [0, {num_actions - 1}]{known}") from None
        if not 0 <= value < num_actions or repeat < 1:
            raise SamplingError(f"--actions item {item.strip()!r}: the action must be in "
                                f"[0, {num_actions - 1}] and the count >= 1")
        schedule.extend([value] * repeat)
    return schedule


def parse_class_switches(items, num_samples: int, num_classes: int,
                         class_names=()) -> list[tuple[int, torch.Tensor]]:
    """``["100:3", "200:dog"]`` -> [(frame, labels (num_samples,))], sorted by frame: from that
    frame on, every sample is generated with that class."""
    switches = []
    for item in items or []:
        frame, sep, label = str(item).partition(":")
        try:
            frame = int(frame)
        except ValueError:
            frame = -1
        if not sep or frame < 0:
            raise SamplingError(f"--class-at {item!r} must be FRAME:CLASS with FRAME >= 0")
        switches.append((frame, resolve_labels(label, num_samples, num_classes, class_names,
                                               option="--class-at")))
    return sorted(switches, key=lambda s: s[0])


def resolve_labels(class_arg, num_samples: int, num_classes: int,
                   class_names=(), option: str = "--class") -> torch.Tensor | None:
    """Labels for ``num_samples`` samples: None for an unconditional model; for a conditional one
    ``class_arg`` (an index or a class name, or a list of them, cycled) or, when None, the classes
    in turn. Errors name the command-line ``option`` the classes came from."""
    if num_classes <= 0:
        if class_arg not in (None, [], ()):
            raise SamplingError("this model is unconditional (trained without class labels); "
                                f"{option} cannot be used")
        return None
    if class_arg is None or class_arg == [] or class_arg == ():
        return torch.arange(num_samples) % num_classes
    items = class_arg if isinstance(class_arg, (list, tuple)) else [class_arg]
    names = {str(n).lower(): i for i, n in enumerate(class_names or [])}
    labels = []
    for item in items:
        text = str(item).strip()
        if text.lower() in names:
            labels.append(names[text.lower()])
            continue
        try:
            value = int(text)
        except ValueError:
            known = f" or one of {list(class_names)}" if class_names else ""
            raise SamplingError(f"{option} {text!r} is not a class index in "
                                f"[0, {num_classes - 1}]{known}") from None
        if not 0 <= value < num_classes:
            raise SamplingError(f"{option} {value} is out of range: the model has {num_classes} "
                                f"classes (0 to {num_classes - 1})")
        labels.append(value)
    return torch.tensor([labels[i % len(labels)] for i in range(num_samples)], dtype=torch.long)


@torch.no_grad()
def sample_latents(model: nn.Module, shape, *, labels: torch.Tensor | None = None,
                   sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
                   cfg_scale: float = 1.0, seed: int = 0, batch_size: int | None = None,
                   learn_sigma: bool = True, diffusion_steps: int = 1000,
                   prediction: str = "eps", device=None,
                   progress: bool = False, noise: torch.Tensor | None = None,
                   clip_denoised: bool = False, actions: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Sample latents of ``shape`` = (N, C, F, h, w).

    The initial noise of all N samples is drawn at once from ``seed`` (so it does not depend on
    ``batch_size``); later DDPM / DDIM(eta > 0) noise comes from the same generator, batch after
    batch. ``cfg_scale`` != 1 applies classifier-free guidance (conditional models only).
    ``clip_denoised`` clamps each predicted x_0 to [-1, 1] (right for pixels, not for latents).
    """
    if sampler not in ("ddpm", "ddim"):
        raise SamplingError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    steps = default_steps(sampler) if steps is None else int(steps)
    if not 1 <= steps <= diffusion_steps:
        raise SamplingError(f"--steps must be in [1, {diffusion_steps}], got {steps}")
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise SamplingError(f"--eta must be in [0, 1], got {eta}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise SamplingError(f"--cfg-scale must be a finite number >= 0, got {cfg_scale}")
    null_class = getattr(model, "null_class", None)
    if labels is None and cfg_scale != 1.0:
        raise SamplingError("classifier-free guidance (--cfg-scale other than 1) needs a "
                            "class-conditional model")
    if labels is not None and null_class is None:
        raise SamplingError("class labels were given but the model is unconditional")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = int(shape[0])
    generator = torch.Generator(device=device).manual_seed(int(seed))
    if noise is None:
        noise = torch.randn(tuple(shape), generator=generator, device=device)
    diffusion = create_diffusion(str(steps), diffusion_steps=diffusion_steps,
                                 learn_sigma=learn_sigma, prediction=prediction)
    net = model
    if labels is not None and cfg_scale != 1.0:
        net = classifier_free_guidance(model, float(cfg_scale), int(null_class))
    batch_size = n if batch_size is None else max(1, int(batch_size))
    out = []
    for lo in range(0, n, batch_size):
        kwargs = {} if labels is None else {"y": labels[lo:lo + batch_size].to(device)}
        if actions is not None:  # per-frame actions of an action-conditioned causal model
            kwargs["actions"] = actions[lo:lo + batch_size].to(device)
        x = noise[lo:lo + batch_size]
        if sampler == "ddpm":
            z = diffusion.p_sample_loop(net, x.shape, noise=x, model_kwargs=kwargs,
                                        progress=progress, generator=generator,
                                        clip_denoised=clip_denoised)
        else:
            z = diffusion.ddim_sample_loop(net, x.shape, eta=float(eta), noise=x,
                                           model_kwargs=kwargs, progress=progress,
                                           generator=generator, clip_denoised=clip_denoised)
        out.append(z)
    return torch.cat(out)


@torch.no_grad()
def sample_videos(model: nn.Module, autoencoder: Autoencoder, num_samples: int, num_frames: int,
                  latent_size, **kwargs) -> torch.Tensor:
    """Sample ``num_samples`` videos ``(N, 3, F, H, W)`` in [-1, 1]; keyword arguments as for
    :func:`sample_latents` (``clip_denoised`` defaults to True in pixel space)."""
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    kwargs.setdefault("clip_denoised", isinstance(autoencoder, PixelAutoencoder))
    shape = (int(num_samples), autoencoder.latent_channels, int(num_frames), int(h), int(w))
    latents = sample_latents(model, shape, **kwargs)
    return autoencoder.decode(latents).clamp(-1, 1)


def tile_videos(videos: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, T, H, W, 3) -> (T, H', W', 3): the N videos side by side in a near-square grid."""
    n, t, h, w, c = videos.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((t, padding + rows * (h + padding), padding + cols * (w + padding), c),
                   dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        out[:, y:y + h, x:x + w] = videos[i]
    return out


def upscale_frames(frames: np.ndarray, min_size: int) -> np.ndarray:
    """Nearest-neighbour upscale of small frames (..., H, W, 3) so they can be seen."""
    h, w = frames.shape[-3:-1]
    k = max(1, math.ceil(min_size / max(h, w)))
    if k > 1:
        frames = frames.repeat(k, axis=-3).repeat(k, axis=-2)
    return frames


def grid_path_for(output) -> Path:
    """The grid image of the video ``output``, named after its whole name: ``demo.gif`` ->
    ``demo.gif.png``, so ``demo.mp4`` written beside it gets its own ``demo.mp4.png``."""
    output = Path(output)
    return output.with_name(output.name + ".png")


def save_samples(videos: torch.Tensor, output, fps: int = 8, min_size: int = 128,
                 grid_path=None) -> tuple[Path, Path]:
    """Write ``videos`` (N, 3, F, H, W) in [-1, 1] as one video file (the samples tiled side by
    side; format from the suffix) and a PNG grid (a row per sample, a column per frame) at
    ``grid_path``: by default beside it with ``.png`` for its suffix (``step_0001000.png`` for
    the training loop's ``step_0001000.gif``; ``matten sample`` passes :func:`grid_path_for`).
    Small frames are enlarged to at least ``min_size`` pixels. Returns both paths."""
    output = Path(output)
    if output.suffix.lower() not in VIDEO_SUFFIXES:
        raise SamplingError(f"--output '{output}' must end in one of {', '.join(VIDEO_SUFFIXES)}")
    frames = upscale_frames(video_to_uint8(videos), min_size // 2 if len(videos) > 1 else min_size)
    video_path = write_video(output, tile_videos(frames), fps=fps)
    grid = save_grid_image(output.with_suffix(".png") if grid_path is None else grid_path, frames)
    return video_path, grid
