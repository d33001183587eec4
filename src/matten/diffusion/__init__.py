"""Gaussian diffusion with learned covariance (Improved DDPM): losses, timestep respacing, DDPM and
DDIM samplers, classifier-free guidance, diffusion-forcing noise levels."""

from __future__ import annotations

from collections.abc import Sequence

from .forcing import forcing_timesteps
from .gaussian_diffusion import (
    PREDICTIONS,
    SAMPLERS,
    GaussianDiffusion,
    check_eta,
    linear_beta_schedule,
)
from .guidance import check_cfg_scale, classifier_free_guidance
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "classifier_free_guidance",
    "create_diffusion",
    "linear_beta_schedule",
    "forcing_timesteps",
    "PREDICTIONS",
    "SAMPLERS",
    "check_eta",
    "check_cfg_scale",
]


def create_diffusion(
    timestep_respacing: str | int | Sequence[int] | None = "",
    diffusion_steps: int = 1000,
    learn_sigma: bool = True,
    prediction: str = "eps",
) -> SpacedDiffusion:
    """A linear-schedule diffusion of ``diffusion_steps`` steps, respaced by
    ``timestep_respacing`` (see :func:`space_timesteps`; "" or None keeps every step). Train with
    the default, sample with e.g. "250" or "ddim50". ``prediction``: "eps" or "velocity"."""
    betas = linear_beta_schedule(diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas,
        learn_sigma=learn_sigma,
        prediction=prediction,
    )
