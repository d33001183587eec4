"""Ways to damage a video clip at a given strength: blur, noise, colour flicker, frame shuffle,
partial occlusion. They are what the v2 motion feature network learns to recognise (so its
feature distances grow with the damage), and what tests degrade real clips with to check that a
metric registers partial quality."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "DEGRADATIONS",
    "gaussian_blur",
    "add_noise",
    "colour_flicker",
    "shuffle_frames",
    "occlude",
    "degrade",
]

DEGRADATIONS = ("clean", "blur", "noise", "flicker", "shuffle", "occlusion")


def gaussian_blur(videos: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur every frame of ``(B, C, F, H, W)`` videos with a Gaussian of ``sigma`` pixels
    (separable, edges replicated)."""
    if sigma <= 0:
        return videos
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=videos.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    b, c, t, h, w = videos.shape
    y = videos.reshape(b * c * t, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return y.reshape(b, c, t, h, w)


def add_noise(videos: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian pixel noise of ``std`` (in the [-1, 1] range of the videos), clipped."""
    return (videos + std * torch.randn(videos.shape, generator=gen)).clamp(-1.0, 1.0)


def colour_flicker(videos: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """A random gain and offset per frame and channel, of relative size ``amount``: colour that
    drifts within a clip (a constant colour change is what v1's colour augmentation ignores)."""
    b, c, t = videos.shape[:3]
    gain = 1.0 + amount * torch.randn(b, c, t, 1, 1, generator=gen)
    shift = amount * torch.randn(b, c, t, 1, 1, generator=gen)
    return ((videos + 1.0) * gain - 1.0 + shift).clamp(-1.0, 1.0)


def shuffle_frames(videos: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Move ``fraction`` of each clip's frames (chosen at random) one place along a cycle among
    themselves, so every chosen frame leaves its slot: motion that jumps."""
    t = videos.shape[2]
    k = int(round(fraction * t))
    out = videos.clone()
    if k < 2:
        return out
    for i in range(videos.shape[0]):
        slots = torch.randperm(t, generator=gen)[:k]
        out[i][:, slots] = videos[i][:, slots.roll(1)]
    return out


def occlude(videos: torch.Tensor, area: float, gen: torch.Generator) -> torch.Tensor:
    """Cover ``area`` (a fraction) of each clip with a still rectangle of one random colour."""
    b, _, _, h, w = videos.shape
    out = videos.clone()
    if area <= 0:
        return out
    for i in range(b):
        aspect = 0.5 + 1.5 * float(torch.rand(1, generator=gen))
        ph = max(1, min(h, round(math.sqrt(area * h * w * aspect))))
        pw = max(1, min(w, round(area * h * w / ph)))
        y0 = int(torch.randint(0, h - ph + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - pw + 1, (1,), generator=gen))
        colour = torch.rand(3, generator=gen) * 2.0 - 1.0
        out[i, :, :, y0 : y0 + ph, x0 : x0 + pw] = colour[:, None, None, None]
    return out


def degrade(videos: torch.Tensor, kind: str, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Apply one of :data:`DEGRADATIONS` at ``strength`` in [0, 1]. Strength 1 is: a blur of
    sigma 1.5 px per 16 px of frame, noise of std 0.4, a flicker of 0.25, every frame shuffled,
    or 30% of the frame occluded."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; choose one of {DEGRADATIONS}")
    if kind == "clean" or strength <= 0:
        return videos
    side = min(videos.shape[-2:])
    if kind == "blur":
        return gaussian_blur(videos, 1.5 * strength * side / 16)
    if kind == "noise":
        return add_noise(videos, 0.4 * strength, gen)
    if kind == "flicker":
        return colour_flicker(videos, 0.25 * strength, gen)
    if kind == "shuffle":
        return shuffle_frames(videos, strength, gen)
    return occlude(videos, 0.3 * strength, gen)
