"""Gaussian diffusion with learned covariance (Improved DDPM): losses, timestep respacing, DDPM and
DDIM samplers, classifier-free guidance, diffusion-forcing noise levels."""

from __future__ import annotations

from collections.abc import Sequence

from .forcing import forcing_timesteps
from .gaussian_diffusion import (
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    SAMPLERS,
    SCHEDULES,
    GaussianDiffusion,
    beta_schedule,
    check_eta,
    cosine_beta_schedule,
    linear_beta_schedule,
)
from .guidance import action_guidance, check_cfg_scale, classifier_free_guidance
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "action_guidance",
    "classifier_free_guidance",
    "create_diffusion",
    "linear_beta_schedule",
    "cosine_beta_schedule",
    "beta_schedule",
    "forcing_timesteps",
    "PREDICTIONS",
    "SCHEDULES",
    "LOSS_WEIGHTINGS",
    "SAMPLERS",
    "check_eta",
    "check_cfg_scale",
]


def create_diffusion(
    timestep_respacing: str | int | Sequence[int] | None = "",
    diffusion_steps: int = 1000,
    learn_sigma: bool = True,
    prediction: str = "eps",
    schedule: str = "linear",
    loss_weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
) -> SpacedDiffusion:
    """A diffusion of ``diffusion_steps`` steps of the named noise ``schedule`` ("linear" or
    "cosine"), respaced by ``timestep_respacing`` (see :func:`space_timesteps`; "" or None keeps
    every step). Train with the default, sample with e.g. "250" or "ddim50". ``prediction``: "eps"
    or "velocity"; ``loss_weighting`` ("uniform" or "min_snr") only changes training."""
    betas = beta_schedule(schedule, diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas,
        learn_sigma=learn_sigma,
        prediction=prediction,
        loss_weighting=loss_weighting,
        min_snr_gamma=min_snr_gamma,
    )
