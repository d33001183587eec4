"""Clip sampling and frame transforms: uint8 ``(T, H, W, 3)`` frames -> float ``(C, F, H, W)``.

The default pipeline follows Latte / StyleGAN-V practice: 16 frames with stride 3, resize the
shorter side to the model resolution (bilinear, antialiased), centre crop, random horizontal flip
of the whole clip, scale to [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CLIP_STARTS = ("random", "first", "center")


def as_size(resolution) -> tuple[int, int]:
    """``32`` -> ``(32, 32)``; ``(H, W)`` -> ``(H, W)``; validated positive."""
    if isinstance(resolution, (int, np.integer)):
        size = (int(resolution), int(resolution))
    else:
        size = tuple(int(r) for r in resolution)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(
            f"resolution must be a positive int or (height, width), got {resolution!r}"
        )
    return size


def clip_span(num_frames: int, frame_stride: int) -> int:
    """Frames of the source a clip covers: ``(num_frames - 1) * frame_stride + 1``."""
    if num_frames < 1 or frame_stride < 1:
        raise ValueError(
            f"num_frames and frame_stride must be >= 1, got {num_frames}, {frame_stride}"
        )
    return (num_frames - 1) * frame_stride + 1


def make_generator(seed_or_generator) -> torch.Generator | None:
    """``None`` -> ``None`` (torch's global RNG); an int -> a seeded generator; a generator is
    returned as is."""
    if seed_or_generator is None or isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(int(seed_or_generator))


def sample_clip_indices(
    total_frames: int,
    num_frames: int = 16,
    frame_stride: int = 3,
    start: str | int = "random",
    generator=None,
) -> list[int]:
    """Indices of one clip: ``num_frames`` frames, ``frame_stride`` apart.

    ``start`` is ``"random"`` (uniform over all valid starts; deterministic when ``generator`` is
    a seeded ``torch.Generator`` or an int seed), ``"first"``, ``"center"`` or an explicit index.
    """
    span = clip_span(num_frames, frame_stride)
    if total_frames < span:
        raise ValueError(
            f"a clip of {num_frames} frames with stride {frame_stride} needs {span} "
            f"frames, the video has {total_frames}"
        )
    last_start = total_frames - span
    if isinstance(start, str):
        if start == "random":
            s = int(torch.randint(0, last_start + 1, (1,), generator=make_generator(generator)))
        elif start == "first":
            s = 0
        elif start == "center":
            s = last_start // 2
        else:
            raise ValueError(f"start must be one of {CLIP_STARTS} or an int, got {start!r}")
    else:
        s = int(start)
        if not 0 <= s <= last_start:
            raise ValueError(f"clip start {s} out of range [0, {last_start}]")
    return list(range(s, s + span, frame_stride))


def frames_to_tensor(frames) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` (numpy or torch) -> float32 ``(T, 3, H, W)`` in [0, 255]."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2).float()


def resize_center_crop(video: torch.Tensor, resolution) -> torch.Tensor:
    """Resize ``(T, C, H, W)`` so it covers ``resolution`` (shorter side matches for a square
    target), then centre crop to exactly ``resolution``. Bilinear with antialiasing."""
    th, tw = as_size(resolution)
    h, w = video.shape[-2:]
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        video = F.interpolate(
            video, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True
        )
    top, left = (nh - th) // 2, (nw - tw) // 2
    return video[..., top : top + th, left : left + tw]


def hflip(video: torch.Tensor) -> torch.Tensor:
    """Mirror every frame left-right (the last axis is width)."""
    return torch.flip(video, dims=[-1])


def random_hflip(video: torch.Tensor, p: float = 0.5, generator=None) -> torch.Tensor:
    """Flip the whole clip with probability ``p`` (one decision for all frames)."""
    if p <= 0:
        return video
    if p >= 1 or float(torch.rand((), generator=make_generator(generator))) < p:
        return hflip(video)
    return video


def normalize(video: torch.Tensor) -> torch.Tensor:
    """[0, 255] -> [-1, 1] (clamped)."""
    return (video / 127.5 - 1.0).clamp_(-1.0, 1.0)


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """A float ``(C, F, H, W)`` (or batched ``(B, C, F, H, W)``) video in [-1, 1] -> uint8
    ``(F, H, W, C)`` (or ``(B, F, H, W, C)``), ready for :func:`write_video` / grids."""
    video = torch.as_tensor(video).detach().float().cpu()
    if video.ndim not in (4, 5):
        raise ValueError(f"expected (C, F, H, W) or (B, C, F, H, W), got {tuple(video.shape)}")
    x = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.movedim(-4, -1)
    return np.ascontiguousarray(x.numpy())


class VideoTransform:
    """uint8 frames ``(F, H, W, 3)`` -> float ``(3, F, H, W)`` in [-1, 1]: resize the shorter
    side, centre crop to ``resolution``, random horizontal flip with probability ``hflip_p``."""

    def __init__(self, resolution, hflip_p: float = 0.5):
        self.size = as_size(resolution)
        if not 0.0 <= hflip_p <= 1.0:
            raise ValueError(f"hflip_p must be in [0, 1], got {hflip_p}")
        self.hflip_p = float(hflip_p)

    def __call__(self, frames, generator=None) -> torch.Tensor:
        video = resize_center_crop(frames_to_tensor(frames), self.size)
        video = random_hflip(video, self.hflip_p, generator)
        return normalize(video).permute(1, 0, 2, 3).contiguous()

    def __repr__(self):
        return f"VideoTransform(resolution={self.size}, hflip_p={self.hflip_p})"


__all__ = [
    "as_size",
    "clip_span",
    "make_generator",
    "sample_clip_indices",
    "frames_to_tensor",
    "resize_center_crop",
    "hflip",
    "random_hflip",
    "normalize",
    "video_to_uint8",
    "VideoTransform",
]
