"""Classifier-free guidance: eps = eps_uncond + s * (eps_cond - eps_uncond) (Ho & Salimans), on
class labels or on per-frame actions."""

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
        return guide(out[:batch], out[batch:], cfg_scale, channels)

    return guided


def action_guidance(model: Model, cfg_scale: float, null_action: int) -> Model:
    """Wrap ``model(x, t, actions=..., **kwargs)`` into one guided on its per-frame actions: the
    model runs twice, with the actions and with every one replaced by ``null_action`` (what a
    model trained with action dropout knows as "action unknown"). The two runs are separate
    calls, not one on a doubled batch, so that a streaming model's state (its history, committed
    with the real actions) serves both unchanged. Composes with :func:`classifier_free_guidance`
    (wrap that one). With ``cfg_scale == 1`` the model runs alone."""
    check_cfg_scale(cfg_scale)

    def guided(x: torch.Tensor, t: torch.Tensor, actions: torch.Tensor, **kwargs) -> torch.Tensor:
        cond = model(x, t, actions=actions, **kwargs)
        if cfg_scale == 1:
            return cond
        uncond = model(x, t, actions=torch.full_like(actions, null_action), **kwargs)
        return guide(cond, uncond, cfg_scale, x.shape[1])

    return guided


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, channels: int):
    """The guided output: the eps channels (the first ``channels``) moved from ``uncond`` past
    ``cond`` by ``cfg_scale``; further channels (the learned variance) are ``cond``'s."""
    # lerp is exact at both ends: scale 0 gives uncond, scale 1 gives cond.
    eps = torch.lerp(uncond[:, :channels], cond[:, :channels], float(cfg_scale))
    return torch.cat([eps, cond[:, channels:]], dim=1)
