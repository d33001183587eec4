"""Classifier-free guidance: eps = eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans)."""

from __future__ import annotations

import math

import torch

from .gaussian_diffusion import Model


def check_cfg_scale(cfg_scale) -> None:
    """A guidance scale is a finite number >= 0 (1: no guidance; 0: the unconditional model)."""
    if (
        isinstance(cfg_scale, bool)
        or not isinstance(cfg_scale, (int, float))
        or not math.isfinite(cfg_scale)
        or cfg_scale < 0
    ):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")


def classifier_free_guidance(
    model: Model, cfg_scale: float, null_label: int, batched: tuple[str, ...] = ("actions",)
) -> Model:
    """Wrap a class-conditional ``model(x, t, y=labels)`` into a guided one with the same call.

    The guided model runs ``model`` once on the batch doubled: the first half with the labels,
    the second with every label replaced by ``null_label`` (the class the model was trained to
    treat as "no class"). The eps channels (the first C, C = x.shape[1]) are guided; any further
    channels (the learned variance) are the conditional ones unchanged. Keyword arguments named in
    ``batched`` (per-sample inputs such as per-frame actions) are doubled with the batch; the
    others are passed as they are. With ``cfg_scale == 1`` the guided model is the conditional
    model, run alone.
    """
    check_cfg_scale(cfg_scale)

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        if cfg_scale == 1:  # no guidance: the unconditional half would be wasted work
            return model(x, t, y=y, **kwargs)
        batch, channels = x.shape[:2]
        labels = torch.cat([y, torch.full_like(y, null_label)])
        kwargs = {
            k: torch.cat([v, v]) if k in batched and v is not None else v for k, v in kwargs.items()
        }
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=labels, **kwargs)
        cond, uncond = out[:batch], out[batch:]
        # lerp is exact at both ends: scale 0 gives uncond, scale 1 gives cond.
        eps = torch.lerp(uncond[:, :channels], cond[:, :channels], float(cfg_scale))
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return guided
