"""Moving digits: real handwritten digits bouncing in a frame, in the style of Moving MNIST.

The digits are the 1,797 8x8 scans that ship inside scikit-learn's wheel
(``sklearn.datasets.load_digits``: the test part of the UCI optical digits set, written by 13
people), so nothing is downloaded and nobody here drew them. Each clip holds one or two digits,
upscaled to ``digit_size`` pixels, moving in a straight line at constant speed and bouncing off
the borders. The label is the (first) digit, class names ``"0"`` .. ``"9"``.

Every item is a function of ``(seed, index)``. ``split="test"`` draws its digits from a disjoint
fifth of the scans (every fifth one) and uses another seed, so its clips share neither digit
images nor trajectories with the training split.
"""

from __future__ import annotations

import colorsys
import functools

import numpy as np
import torch
import torch.nn.functional as F

from .synthetic import RenderedVideoDataset, _bounce
from .transforms import as_size

__all__ = ["DIGIT_CLASSES", "MovingDigitsDataset", "build_moving_digits", "digit_images"]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
BACKGROUNDS = ("black", "tinted")
COLOURS = ("white", "random")
TEST_SEED_OFFSET = 1_000_003  # as the synthetic set's test split


@functools.lru_cache(maxsize=1)
def _scans() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 scans as float32 in [0, 1] ``(1797, 8, 8)`` and their digits ``(1797,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # a dependency, but say what is missing if it was left out
        raise ImportError(
            "the moving_digits dataset needs scikit-learn (pip install scikit-learn)"
        ) from exc
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def digit_images(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every scan resized to ``size x size`` (bilinear; antialiased when shrinking), float32 in
    [0, 1], and the digit of each."""
    images, targets = _scans()
    if size != images.shape[1]:
        x = torch.from_numpy(images)[:, None]
        x = F.interpolate(
            x,
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=size < images.shape[1],
        )
        images = x[:, 0].clamp(0.0, 1.0).numpy()
    return images, targets


def split_indices(split: str | None) -> np.ndarray:
    """The scans a split draws from: every fifth (index % 5 == 4) for ``"test"``, the rest for
    ``"train"`` or ``None``."""
    if split not in (None, "train", "test"):
        raise ValueError(f"moving_digits split must be None, 'train' or 'test', got {split!r}")
    every = np.arange(len(_scans()[1]))
    return every[(every % 5 == 4) == (split == "test")]


class MovingDigitsDataset(RenderedVideoDataset):
    """``num_videos`` clips of ``num_digits`` (1 or 2) handwritten digits bouncing in a frame.

    Items are ``{"video": float (3, num_frames, H, W) in [-1, 1], "label": int64}``; the label of
    item ``i`` is ``i % 10`` (balanced classes), the digit drawn first. ``digit_size`` is the
    digit's side in pixels (default half the shorter frame side, Moving MNIST's proportion);
    ``speed`` the range of its displacement per frame as a fraction of the shorter side.
    ``background`` is ``"black"`` or ``"tinted"`` (a dark random colour per clip), ``colour``
    ``"white"`` or ``"random"`` (a bright random hue per digit).
    """

    def __init__(
        self,
        num_videos: int = 512,
        resolution=16,
        num_frames: int = 16,
        seed: int = 0,
        split: str | None = None,
        num_digits: int = 1,
        digit_size: int | None = None,
        speed: tuple[float, float] = (0.04, 0.08),
        background: str = "black",
        colour: str = "white",
    ):
        if num_videos < 1:
            raise ValueError(f"moving_digits num_videos must be >= 1, got {num_videos}")
        if num_frames < 1:
            raise ValueError(f"moving_digits num_frames must be >= 1, got {num_frames}")
        if num_digits not in (1, 2):
            raise ValueError(f"moving_digits num_digits must be 1 or 2, got {num_digits}")
        self.height, self.width = as_size(resolution)
        self.resolution = (self.height, self.width)
        side = min(self.height, self.width)
        self.digit_size = int(digit_size) if digit_size is not None else max(side // 2, 2)
        if not 2 <= self.digit_size <= side:
            raise ValueError(
                f"moving_digits digit_size must be in [2, {side}] (the frame's "
                f"shorter side), got {digit_size}"
            )
        lo, hi = float(speed[0]), float(speed[1])
        if not 0 <= lo <= hi:
            raise ValueError(
                f"moving_digits speed must be (low, high) with 0 <= low <= high, got {speed}"
            )
        if background not in BACKGROUNDS:
            raise ValueError(
                f"moving_digits background must be one of {BACKGROUNDS}, got {background!r}"
            )
        if colour not in COLOURS:
            raise ValueError(f"moving_digits colour must be one of {COLOURS}, got {colour!r}")
        self.num_videos, self.num_frames = int(num_videos), int(num_frames)
        self.split, self.num_digits, self.speed = split, int(num_digits), (lo, hi)
        self.background, self.colour = background, colour
        pool = split_indices(split)
        self.seed = int(seed) + (TEST_SEED_OFFSET if split == "test" else 0)
        self.images, targets = digit_images(self.digit_size)
        # The scans of the split, by digit: the first digit of a clip is drawn from its class.
        self.image_indices = pool
        self.by_class = [pool[targets[pool] == c] for c in range(10)]
        self.num_classes, self.class_names = 10, list(DIGIT_CLASSES)

    def label_of(self, index: int) -> int:
        return index % 10

    def layout(self, index: int) -> tuple[int, np.ndarray, list[dict]]:
        """Item ``index``'s label, background colour (RGB in [0, 1]) and digits: for each, the
        scan it shows (``image``, an index into ``load_digits()``), its top-left corner per frame
        (``y``, ``x``, whole pixels) and its ``colour``. The first digit is the labelled one."""
        if not 0 <= index < self.num_videos:
            raise IndexError(f"index {index} out of range for {self.num_videos} moving digits")
        rng = np.random.default_rng([self.seed, index])
        label = self.label_of(index)
        background = rng.uniform(0.0, 0.2, 3) if self.background == "tinted" else np.zeros(3)
        digits = []
        for k in range(self.num_digits):
            pool = self.by_class[label] if k == 0 else self.image_indices
            y, x = self._trajectory(rng)
            colour = (
                np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), 1.0))
                if self.colour == "random"
                else np.ones(3)
            )
            digits.append({"image": int(rng.choice(pool)), "y": y, "x": x, "colour": colour})
        return label, background, digits

    def _trajectory(self, rng) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corners ``(y, x)`` per frame: a straight line at a random angle and speed,
        folded back at the borders (a bounce), rounded to whole pixels as in Moving MNIST."""
        room_y, room_x = self.height - self.digit_size, self.width - self.digit_size
        t = np.arange(self.num_frames, dtype=np.float64)
        step = rng.uniform(*self.speed) * min(self.height, self.width)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        y = _bounce(rng.uniform(0, room_y) + step * np.sin(angle) * t, 0.0, room_y)
        x = _bounce(rng.uniform(0, room_x) + step * np.cos(angle) * t, 0.0, room_x)
        return np.rint(y).astype(int), np.rint(x).astype(int)

    def render(self, index: int) -> tuple[np.ndarray, int]:
        """Draw item ``index``: float32 frames ``(F, H, W, 3)`` in [0, 1] and its label."""
        label, background, digits = self.layout(index)
        s = self.digit_size
        video = np.broadcast_to(background, (self.num_frames, self.height, self.width, 3))
        video = video.astype(np.float32)
        for digit in reversed(digits):  # the labelled digit last, on top where they overlap
            alpha = np.zeros((self.num_frames, self.height, self.width, 1), np.float32)
            scan = self.images[digit["image"]][..., None]
            for f, (y, x) in enumerate(zip(digit["y"], digit["x"], strict=True)):
                alpha[f, y : y + s, x : x + s] = scan
            # Ink over what is below, as a pen would: alpha is the scan's darkness.
            video = video * (1.0 - alpha) + alpha * digit["colour"].astype(np.float32)
        return video, label

    def __repr__(self):
        return (
            f"MovingDigitsDataset(num_videos={self.num_videos}, resolution={self.resolution}, "
            f"num_frames={self.num_frames}, num_digits={self.num_digits}, "
            f"digit_size={self.digit_size}, split={self.split!r}, seed={self.seed})"
        )


def build_moving_digits(
    root,
    resolution,
    num_frames: int = 16,
    frame_stride: int = 3,
    split: str | None = None,
    **kwargs,
) -> MovingDigitsDataset:
    """The registry's builder: ``root`` and ``frame_stride`` do not apply (the clips are drawn,
    not read); the other keyword arguments go to :class:`MovingDigitsDataset`."""
    kwargs.setdefault("num_videos", 512)
    return MovingDigitsDataset(resolution=resolution, num_frames=num_frames, split=split, **kwargs)
