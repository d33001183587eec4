"""A built-in synthetic video set: bright shapes moving smoothly over a dark background.

Nothing is downloaded; every item is drawn with numpy from a generator seeded by (seed, index),
so an item is the same every time. The class is the kind of motion, so a small class-conditional
model can learn it:

    0 left_right     bounce horizontally            3 orbit          circle clockwise
    1 up_down        bounce vertically              4 anti_diagonal  bounce along the other diagonal
    2 diagonal       bounce along the main diagonal 5 counter_orbit  circle counter-clockwise
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import as_size

MOTION_TYPES = ("left_right", "up_down", "diagonal", "orbit", "anti_diagonal", "counter_orbit")


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold ``p`` into ``[lo, hi]`` like a ball bouncing between two walls (a triangle wave)."""
    length = max(hi - lo, 1e-6)
    q = np.mod(p - lo, 2 * length)
    return lo + np.where(q <= length, q, 2 * length - q)


class RenderedVideoDataset(Dataset):
    """A set of ``num_videos`` clips drawn on demand: a subclass's ``render(index)`` gives the
    frames, float (F, H, W, 3) in [0, 1], and the label; items are
    ``{"video": float (3, F, H, W) in [-1, 1], "label": int64}``."""

    num_videos: int

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.num_videos
        frames, label = self.render(index)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).mul(2.0).sub(1.0).clamp(-1.0, 1.0)
        return {"video": video.contiguous(), "label": torch.tensor(label, dtype=torch.int64)}


class SyntheticVideoDataset(RenderedVideoDataset):
    """``num_videos`` procedurally drawn clips of 1-2 squares/discs in motion.

    Items are ``{"video": float (3, num_frames, H, W) in [-1, 1], "label": int64}``; with
    ``num_classes=0`` the motion is still one of the first four kinds, drawn at random, and every
    label is 0 (unconditional data). ``speed`` is the object's displacement per frame as a
    fraction of the shorter image side; ``size`` is the range of object radii, as the same fraction.
    """

    def __init__(
        self,
        num_videos: int,
        resolution=32,
        num_frames: int = 16,
        num_classes: int = 4,
        seed: int = 0,
        max_objects: int = 2,
        speed: tuple[float, float] = (0.03, 0.06),
        size: tuple[float, float] = (0.10, 0.16),
    ):
        if num_videos < 1:
            raise ValueError(f"num_videos must be >= 1, got {num_videos}")
        if not 0 <= num_classes <= len(MOTION_TYPES):
            raise ValueError(
                f"num_classes must be in [0, {len(MOTION_TYPES)}] (one class per "
                f"motion type {MOTION_TYPES}), got {num_classes}"
            )
        if num_frames < 1 or max_objects < 1:
            raise ValueError("num_frames and max_objects must be >= 1")
        self.num_videos, self.num_frames = int(num_videos), int(num_frames)
        self.height, self.width = as_size(resolution)
        self.resolution = (self.height, self.width)
        self.num_classes, self.seed = int(num_classes), int(seed)
        self.max_objects, self.speed = int(max_objects), (float(speed[0]), float(speed[1]))
        self.size = (float(size[0]), float(size[1]))
        if not 0 < self.size[0] <= self.size[1] < 0.5:
            raise ValueError(f"size must be (low, high) with 0 < low <= high < 0.5, got {size}")
        self.class_names = list(MOTION_TYPES[: self.num_classes])
        self.skipped: dict[str, list[str]] = {}

    def label_of(self, index: int) -> int:
        return index % self.num_classes if self.num_classes else 0

    # -- drawing ---------------------------------------------------------------------------

    def _trajectory(self, rng, motion: str, radius: float) -> tuple[np.ndarray, np.ndarray]:
        h, w, s = self.height, self.width, min(self.height, self.width)
        t = np.arange(self.num_frames, dtype=np.float64)
        step = rng.uniform(*self.speed) * s * rng.choice([-1.0, 1.0])
        x_lo, x_hi, y_lo, y_hi = radius, w - radius, radius, h - radius
        if motion == "left_right":
            x = _bounce(rng.uniform(x_lo, x_hi) + step * t, x_lo, x_hi)
            y = np.full_like(t, rng.uniform(y_lo, y_hi))
        elif motion == "up_down":
            x = np.full_like(t, rng.uniform(x_lo, x_hi))
            y = _bounce(rng.uniform(y_lo, y_hi) + step * t, y_lo, y_hi)
        elif motion in ("diagonal", "anti_diagonal"):
            # u bounces along a diagonal line; both coordinates follow it, so a bounce reverses
            # the direction but never changes which diagonal the object travels on.
            lo, hi = 0.0, rng.uniform(0.6, 1.0) * min(x_hi - x_lo, y_hi - y_lo)
            u = _bounce(rng.uniform(lo, hi) + step / np.sqrt(2) * t, lo, hi)
            ox = rng.uniform(x_lo, x_hi - hi)
            oy = rng.uniform(y_lo, y_hi - hi)
            x = ox + u
            y = oy + (u if motion == "diagonal" else hi - u)
        else:  # orbit / counter_orbit (image y points down: increasing angle is clockwise)
            max_r = max(min(w, h) / 2 - radius, 1.0)
            r = rng.uniform(0.5, 0.9) * max_r
            cx = w / 2 + rng.uniform(-1, 1) * max(w / 2 - radius - r, 0)
            cy = h / 2 + rng.uniform(-1, 1) * max(h / 2 - radius - r, 0)
            omega = abs(step) / r * (1.0 if motion == "orbit" else -1.0)
            phase = rng.uniform(0, 2 * np.pi)
            x = cx + r * np.cos(phase + omega * t)
            y = cy + r * np.sin(phase + omega * t)
        return x, y

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """Draw item ``index``: float32 frames ``(F, H, W, 3)`` in [0, 1] and its label."""
        if not 0 <= index < self.num_videos:
            raise IndexError(f"index {index} out of range for {self.num_videos} synthetic videos")
        rng = np.random.default_rng([self.seed, index])
        label = self.label_of(index)
        motion = MOTION_TYPES[label] if self.num_classes else MOTION_TYPES[rng.integers(4)]
        h, w, s = self.height, self.width, min(self.height, self.width)

        base = rng.uniform(0.0, 0.2, size=3)
        gradient = np.linspace(-0.05, 0.05, h)[:, None, None] * rng.choice([-1.0, 1.0])
        frame = np.clip(base[None, None, :] + gradient, 0, 1) * np.ones((h, w, 1))
        video = np.broadcast_to(frame, (self.num_frames, h, w, 3)).copy()

        ys = np.arange(h, dtype=np.float64)[None, :, None] + 0.5
        xs = np.arange(w, dtype=np.float64)[None, None, :] + 0.5
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            radius = rng.uniform(*self.size) * s
            colour = np.array(
                colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.85, 1.0))
            )  # bright, any hue
            x, y = self._trajectory(rng, motion, radius)
            dx, dy = xs - x[:, None, None], ys - y[:, None, None]  # (F, H, W)
            if rng.random() < 0.5:  # disc with a one-pixel antialiased edge
                alpha = np.clip(radius + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)
            else:  # square
                alpha = np.clip(radius + 0.5 - np.abs(dx), 0.0, 1.0) * np.clip(
                    radius + 0.5 - np.abs(dy), 0.0, 1.0
                )
            alpha = alpha[..., None]
            video = video * (1.0 - alpha) + alpha * colour
        return video.astype(np.float32), label

    def __repr__(self):
        return (
            f"SyntheticVideoDataset(num_videos={self.num_videos}, "
            f"resolution={self.resolution}, "
            f"num_frames={self.num_frames}, num_classes={self.num_classes}, seed={self.seed})"
        )
