"""A small video feature network that Matten trains itself, for a Fréchet distance offline.

FVD needs the I3D network's weights, which Matten never downloads. When they are not available,
this 3D CNN -- trained in about a minute on CPU to classify the motion type of the built-in
synthetic clips -- gives a feature space in which motion matters, so a Fréchet distance in it
still ranks generated videos sensibly. Its numbers are only comparable with each other (same
weights), never with published FVD; the extractor says so with ``comparable_to_published``.

Two versions, told apart by name in reports and caches:

* ``matten-motion-net-v1`` learns the motion class only. Anything that is not a crisp moving
  shape lands far from the data, so its distance separates real from generated sharply but
  saturates: slightly and badly blurred clips score alike.
* ``matten-motion-net-v2`` (the default) also learns to recognise how a clip was degraded and how
  strongly: half of its training clips are blurred, noised, colour-flickered, frame-shuffled or
  partly occluded at a random strength, and two extra heads predict the kind and the strength.
  The embedding then has to place clips by how damaged they are, so the distance grows
  steadily with the damage (see :func:`degrade`).

Training clips are drawn from a seed range of their own, so the net never sees the clips that
evaluation draws from the synthetic set with ordinary seeds, and its held-out accuracy is
measured on yet another seed range.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.synthetic import MOTION_TYPES
from .degradations import DEGRADATIONS

__all__ = [
    "DEFAULT_VERSION",
    "MOTION_NET_NAME",
    "MOTION_NET_NAMES",
    "MotionFeatureNet",
    "MotionFeatureNetV2",
    "NETS",
    "check_version",
]

MOTION_NET_NAME = "matten-motion-net-v1"  # the first version's name (kept for its caches)
MOTION_NET_NAMES = {1: MOTION_NET_NAME, 2: "matten-motion-net-v2"}
DEFAULT_VERSION = 2
# Per version: bump when its architecture or training recipe changes (a new cache entry).
ARCH_VERSIONS = {1: 1, 2: 1}
DEFAULT_STEPS = {1: 300, 2: 400}  # v2 learns two tasks: a third more steps (about 50 s on 1 core)

# Seeds far from the ones configs and tests use (0, 1, 2, ...), so training and validation never
# draw an evaluation clip: SyntheticVideoDataset items are a function of (seed, index).
TRAIN_SEED_BASE = 7_340_000
VAL_SEED_BASE = 7_350_000

DEFAULT_SPEED = (0.03, 0.1)  # covers the synthetic default (0.03-0.06) and the demo (0.06-0.1)


class MotionFeatureNet(nn.Module):
    """Compact 3D CNN: ``(B, 3, F, H, W)`` in [-1, 1] -> ``feature_dim`` embedding (+ class head).

    Inputs of any size are first resampled to ``internal_frames x internal_size^2`` so that the
    features of e.g. 16x16x8 and 32x32x16 clips live in the same space. The frames and their
    temporal differences go through four Conv3d+GroupNorm+SiLU stages, a global average pool
    and a linear projection to the embedding; ``head`` is a linear classifier over motion types.
    """

    version = 1

    def __init__(
        self,
        feature_dim: int = 128,
        num_classes: int = len(MOTION_TYPES),
        width: int = 16,
        internal_size: int = 32,
        internal_frames: int = 8,
    ):
        super().__init__()
        self.feature_dim, self.num_classes, self.width = int(feature_dim), int(num_classes), width
        self.internal_size, self.internal_frames = int(internal_size), int(internal_frames)

        def stage(cin, cout, stride):
            return nn.Sequential(
                nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(8, cout // 4), cout),
                nn.SiLU(),
            )

        w = width
        # Spatial stride first (cheap, objects are several pixels wide), temporal stride only after
        # two full-rate temporal convolutions so motion direction is resolved early.
        self.stages = nn.Sequential(
            stage(6, w, (1, 2, 2)),  # T x 16 x 16
            stage(w, 2 * w, (1, 2, 2)),  # T x 8 x 8
            stage(2 * w, 4 * w, (2, 2, 2)),  # T/2 x 4 x 4
            stage(4 * w, 4 * w, (1, 1, 1)),
        )
        self.proj = nn.Linear(4 * w, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    @property
    def name(self) -> str:
        return MOTION_NET_NAMES[self.version]

    def config(self) -> dict:
        return {
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
            "width": self.width,
            "internal_size": self.internal_size,
            "internal_frames": self.internal_frames,
        }

    def preprocess(self, videos: torch.Tensor) -> torch.Tensor:
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must have shape (B, 3, F, H, W), got {tuple(videos.shape)}")
        videos = videos.to(dtype=self.proj.weight.dtype)
        size = (self.internal_frames, self.internal_size, self.internal_size)
        if tuple(videos.shape[2:]) != size:
            # Antialiasing matters when shrinking large frames; trilinear alone would skip pixels.
            b, c, t, h, w = videos.shape
            if (h, w) != size[1:]:
                x = videos.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
                x = F.interpolate(
                    x,
                    size=size[1:],
                    mode="bilinear",
                    align_corners=False,
                    antialias=h > size[1] or w > size[2],
                )
                videos = x.reshape(b, t, c, *size[1:]).permute(0, 2, 1, 3, 4)
            if t != size[0]:
                videos = F.interpolate(videos, size=size, mode="trilinear", align_corners=False)
        return videos

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(videos)
        # Frame differences as extra channels: motion is the signal, and the objects are small,
        # so handing the first layer where things move makes training start much faster.
        diff = torch.diff(x, dim=2, prepend=x[:, :, :1])
        x = self.stages(torch.cat([x, diff], dim=1))
        return self.proj(x.mean(dim=(2, 3, 4)))

    def forward(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(features (B, feature_dim), logits (B, num_classes))``."""
        feats = self.features(videos)
        return feats, self.head(feats)


class MotionFeatureNetV2(MotionFeatureNet):
    """:class:`MotionFeatureNet` with a second head on the same embedding that predicts how a
    clip was degraded: logits over :data:`DEGRADATIONS` and the strength in [0, 1]."""

    version = 2

    def __init__(
        self,
        feature_dim: int = 128,
        num_classes: int = len(MOTION_TYPES),
        width: int = 16,
        internal_size: int = 32,
        internal_frames: int = 8,
    ):
        super().__init__(feature_dim, num_classes, width, internal_size, internal_frames)
        self.degradation_head = nn.Linear(self.feature_dim, len(DEGRADATIONS) + 1)

    def degradation(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kind logits (B, len(DEGRADATIONS)), strength (B,))`` from features."""
        out = self.degradation_head(feats)
        return out[:, :-1], out[:, -1]


NETS = {1: MotionFeatureNet, 2: MotionFeatureNetV2}


def check_version(version) -> int:
    if version not in NETS:
        raise ValueError(f"unknown motion net version {version!r}; choose one of {sorted(NETS)}")
    return int(version)
