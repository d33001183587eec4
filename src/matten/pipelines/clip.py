"""Clips from a trained clip model: the sampling loop and a diffusers-style pipeline.

    pipe = MattenPipeline.from_pretrained("runs/demo")
    videos = pipe(num_samples=4, class_labels="orbit", seed=3)    # (4, 3, F, H, W) in [-1, 1]

Sampling runs :class:`matten.diffusion.GaussianDiffusion`'s DDPM or DDIM loop, respaced, with
:func:`matten.diffusion.classifier_free_guidance` for class-conditional models; nothing else
here steps through timesteps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ..checkpoint import LoadedModel, load_for_sampling
from ..data import video_to_uint8
from ..devices import resolve_device
from ..diffusion import classifier_free_guidance
from ..latent import Autoencoder, PixelAutoencoder
from .settings import SamplingError, check_sampling, resolve_labels, run_sampler, sampling_diffusion

__all__ = ["sample_latents", "sample_videos", "MattenPipeline"]

_Pipeline = TypeVar("_Pipeline", bound="MattenPipeline")


@torch.no_grad()
def sample_latents(
    model: nn.Module,
    shape,
    *,
    labels: torch.Tensor | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    prediction: str = "eps",
    schedule: str = "linear",
    device=None,
    progress: bool = False,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    actions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample latents of ``shape`` = (N, C, F, h, w).

    The initial noise of all N samples is drawn at once from ``seed`` (so it does not depend on
    ``batch_size``); later DDPM / DDIM(eta > 0) noise comes from the same generator, batch after
    batch. ``cfg_scale`` != 1 applies classifier-free guidance (conditional models only).
    ``clip_denoised`` clamps each predicted x_0 to [-1, 1] (right for pixels, not for latents).
    ``actions`` (N, F) are the per-frame actions of an action-conditioned model.
    """
    steps = check_sampling(
        sampler, steps, eta, cfg_scale, diffusion_steps, conditional=labels is not None
    )
    null_class = getattr(model, "null_class", None)
    if labels is not None and null_class is None:
        raise SamplingError("class labels were given but the model is unconditional")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n = int(shape[0])
    generator = torch.Generator(device=device).manual_seed(int(seed))
    if noise is None:
        noise = torch.randn(tuple(shape), generator=generator, device=device)
    diffusion = sampling_diffusion(
        steps,
        diffusion_steps=diffusion_steps,
        learn_sigma=learn_sigma,
        prediction=prediction,
        schedule=schedule,
    )
    net: Callable[..., torch.Tensor] = model
    if labels is not None and cfg_scale != 1.0:
        assert null_class is not None  # refused above
        net = classifier_free_guidance(model, float(cfg_scale), int(null_class))
    batch_size = n if batch_size is None else max(1, int(batch_size))
    out = []
    for lo in range(0, n, batch_size):
        kwargs = {} if labels is None else {"y": labels[lo : lo + batch_size].to(device)}
        if actions is not None:
            kwargs["actions"] = actions[lo : lo + batch_size].to(device)
        out.append(
            run_sampler(
                diffusion,
                net,
                noise[lo : lo + batch_size],
                sampler=sampler,
                eta=eta,
                model_kwargs=kwargs,
                generator=generator,
                clip_denoised=clip_denoised,
                progress=progress,
            )
        )
    return torch.cat(out)


@torch.no_grad()
def sample_videos(
    model: nn.Module,
    autoencoder: Autoencoder,
    num_samples: int,
    num_frames: int,
    latent_size,
    **kwargs,
) -> torch.Tensor:
    """Sample ``num_samples`` videos ``(N, 3, F, H, W)`` in [-1, 1]; keyword arguments as for
    :func:`sample_latents` (``clip_denoised`` defaults to True in pixel space)."""
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    kwargs.setdefault("clip_denoised", isinstance(autoencoder, PixelAutoencoder))
    shape = (int(num_samples), autoencoder.latent_channels, int(num_frames), int(h), int(w))
    latents = sample_latents(model, shape, **kwargs)
    return autoencoder.decode(latents).clamp(-1, 1)


class MattenPipeline:
    """A trained model, its autoencoder and its run's sampling defaults, called like a
    diffusers pipeline. Settings left as None take the run's ``sample`` section (sampler,
    steps, eta, cfg_scale, seed, num_samples)."""

    def __init__(self, loaded: LoadedModel, device: torch.device):
        self.loaded, self.device = loaded, device

    @classmethod
    def from_pretrained(
        cls: type[_Pipeline], path, *, weights: str = "ema", device=None, dtype=None, vae_path=None
    ) -> _Pipeline:
        """Load a run folder, its ``checkpoints`` folder or one checkpoint folder (local paths
        only). ``dtype`` (e.g. ``torch.bfloat16``) casts the model for inference."""
        device = resolve_device(device)
        loaded = load_for_sampling(path, weights=weights, device=device, vae_path=vae_path)
        if dtype is not None:
            loaded.model.to(dtype)
        return cls(loaded, device)

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def autoencoder(self) -> Autoencoder:
        return self.loaded.autoencoder

    def default(self, name: str, value, fallback):
        """``value``, else the run's ``sample.<name>``, else ``fallback``."""
        if value is not None:
            return value
        stored = self.loaded.sample_settings.get(name)
        return fallback if stored is None else stored

    def guidance_scale(self, cfg_scale, labels) -> float:
        """``cfg_scale``, else the run's for a class-conditional call; 1 (no guidance) when the
        call has no labels and none was asked for."""
        if labels is not None:
            return float(self.default("cfg_scale", cfg_scale, 1.0))
        return 1.0 if cfg_scale is None else cfg_scale

    def labels(self, class_labels, num_samples: int, option: str = "--class"):
        return resolve_labels(
            class_labels,
            num_samples,
            self.loaded.num_classes,
            self.loaded.class_names,
            option=option,
        )

    def __call__(
        self,
        num_samples: int | None = None,
        class_labels=None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        cfg_scale: float | None = None,
        seed: int | None = None,
        actions: torch.Tensor | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        output_type: str = "pt",
    ):
        """``num_samples`` videos (N, 3, F, H, W) in [-1, 1] (``output_type="pt"``), or uint8
        (N, F, H, W, 3) arrays (``"np"``). ``class_labels``: an index, a class name or a list
        of them (cycled); default all classes in turn. ``actions`` (N, F): per-frame actions of
        an action-conditioned model (default: the training clips' own)."""
        loaded = self.loaded
        num_samples = int(self.default("num_samples", num_samples, 8))
        if num_samples < 1:
            raise SamplingError(f"--num-samples must be >= 1, got {num_samples}")
        labels = self.labels(class_labels, num_samples)
        cfg_scale = self.guidance_scale(cfg_scale, labels)
        if actions is None and self.model.takes_actions:
            actions = loaded.training_actions(num_samples)
        videos = sample_videos(
            self.model,
            self.autoencoder,
            num_samples,
            loaded.num_frames,
            loaded.latent_size,
            labels=labels,
            sampler=self.default("sampler", sampler, "ddim"),
            steps=self.default("steps", steps, None),
            eta=float(self.default("eta", eta, 0.0)),
            cfg_scale=cfg_scale,
            seed=int(self.default("seed", seed, 0)),
            batch_size=batch_size,
            learn_sigma=loaded.learn_sigma,
            diffusion_steps=loaded.diffusion_steps,
            prediction=loaded.prediction,
            schedule=loaded.schedule,
            actions=actions,
            device=self.device,
            progress=progress,
        )
        if output_type == "np":
            return video_to_uint8(videos)
        if output_type != "pt":
            raise SamplingError(f"output_type must be 'pt' or 'np', got {output_type!r}")
        return videos

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({Path(self.loaded.folder)}, step {self.loaded.step}, "
            f"{self.loaded.meta['model_config'].get('name')})"
        )
