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

import contextlib
import inspect
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.synthetic import MOTION_TYPES, SyntheticVideoDataset
from ..data.transforms import as_size
from .degradations import DEGRADATIONS, degrade

__all__ = [
    "DEFAULT_VERSION",
    "MOTION_NET_NAME",
    "MOTION_NET_NAMES",
    "MotionFeatureNet",
    "MotionFeatureNetV2",
    "NETS",
    "check_version",
    "net_settings",
    "train_motion_net",
]

MOTION_NET_NAME = "matten-motion-net-v1"  # the first version's name (kept for its caches)
MOTION_NET_NAMES = {1: MOTION_NET_NAME, 2: "matten-motion-net-v2"}
DEFAULT_VERSION = 2
# Per version: bump when its architecture or training recipe changes (a new cache entry).
_ARCH_VERSION = {1: 1, 2: 1}
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


V2_CLEAN_SHARE = 0.5  # share of v2's training clips left undegraded
V2_DEGRADATION_WEIGHT = 0.5  # weight of the degradation loss against the motion loss
V2_STRENGTH_WEIGHT = 4.0  # weight of the strength error (MSE in [0, 1]) within it


def _degrade_batch(
    videos: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Degrade about half of a batch, each clip with a random kind and a strength in [0.1, 1];
    returns the videos, the kind indices (0 = clean) and the strengths (0 when clean)."""
    b = videos.shape[0]
    kinds = torch.randint(1, len(DEGRADATIONS), (b,), generator=gen)
    kinds[torch.rand(b, generator=gen) < V2_CLEAN_SHARE] = 0
    strength = torch.empty(b).uniform_(0.1, 1.0, generator=gen) * (kinds > 0)
    out = videos.clone()
    for i in torch.nonzero(kinds).flatten().tolist():
        out[i : i + 1] = degrade(videos[i : i + 1], DEGRADATIONS[kinds[i]], float(strength[i]), gen)
    return out, kinds, strength


def _v2_loss(net: MotionFeatureNetV2, videos, labels, gen) -> torch.Tensor:
    videos, kinds, strength = _degrade_batch(videos, gen)
    feats, logits = net(videos)
    kind_logits, predicted = net.degradation(feats)
    # A shuffled clip no longer shows its motion class: it only trains the degradation heads.
    keep = kinds != DEGRADATIONS.index("shuffle")
    motion = F.cross_entropy(logits[keep], labels[keep])
    damage = F.cross_entropy(kind_logits, kinds) + V2_STRENGTH_WEIGHT * F.mse_loss(
        predicted, strength
    )
    return motion + V2_DEGRADATION_WEIGHT * damage


# ----------------------------------------------------------------------------------------------
# training


def _clips(
    dataset: SyntheticVideoDataset, start: int, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` consecutive items as one ``(B, 3, F, H, W)`` batch in [-1, 1].

    Renders with numpy and converts the whole batch at once; per-item tensor conversion is far
    slower on a busy CPU.
    """
    frames, labels = zip(*(dataset.render(i) for i in range(start, start + count)), strict=True)
    video = torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3)
    return (video * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous(), torch.tensor(labels)


def _augment(videos: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Colour augmentation, so the features describe shapes and motion rather than hues.

    Per clip: a random channel permutation, random per-channel gain, a global brightness shift
    and contrast scale, occasional greyscale, and a little pixel noise. Geometry and time are left
    alone because flips and time reversal change the motion class.
    """
    b = videos.shape[0]
    x = (videos + 1.0) / 2.0
    perm = torch.argsort(torch.rand(b, 3, generator=gen), dim=1)
    x = torch.gather(x, 1, perm[:, :, None, None, None].expand_as(x))
    gain = 0.6 + 0.8 * torch.rand(b, 3, 1, 1, 1, generator=gen)
    x = x * gain
    grey = torch.rand(b, generator=gen) < 0.2
    x = torch.where(grey[:, None, None, None, None], x.mean(dim=1, keepdim=True).expand_as(x), x)
    contrast = 0.7 + 0.6 * torch.rand(b, 1, 1, 1, 1, generator=gen)
    mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    x = (x - mean) * contrast + mean + 0.2 * (torch.rand(b, 1, 1, 1, 1, generator=gen) - 0.5)
    x = x + 0.02 * torch.randn(x.shape, generator=gen)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0)


@torch.no_grad()
def _accuracy(net: MotionFeatureNet, dataset: SyntheticVideoDataset, batch_size: int) -> float:
    was_training = net.training
    net.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        videos, labels = _clips(dataset, start, min(batch_size, len(dataset) - start))
        correct += int((net(videos)[1].argmax(dim=1) == labels).sum())
    net.train(was_training)
    return correct / len(dataset)


def train_motion_net(
    resolution=16,
    num_frames: int = 8,
    num_classes: int = len(MOTION_TYPES),
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 2e-3,
    feature_dim: int = 128,
    width: int = 16,
    max_objects: int = 2,
    speed: tuple[float, float] = DEFAULT_SPEED,
    num_val: int = 240,
    augment: bool = True,
    num_threads: int | None = 1,
    log_every: int = 0,
    version: int = DEFAULT_VERSION,
) -> tuple[MotionFeatureNet, dict]:
    """Train a motion feature net of ``version`` 1 (:class:`MotionFeatureNet`: the motion type
    of synthetic clips) or 2 (:class:`MotionFeatureNetV2`: that, and how each clip was degraded).

    ``steps`` defaults to :data:`DEFAULT_STEPS` of the version. Every step draws fresh clips
    (``resolution``, ``num_frames``) from a training seed range, so there is no overfitting to
    a fixed set; accuracy is then measured on ``num_val`` clean clips from a separate range. Returns
    the net (in eval mode) and a dict with the settings, the losses, the
    held-out accuracy and the training time.

    ``num_threads`` caps torch's CPU threads during training only (restored afterwards; ``None``
    leaves torch's setting). One thread is the default: the convolutions are small, and on a CPU
    shared with other work, extra threads mostly spin waiting on each other (several times
    slower on a busy 2-core machine). It also keeps the result reproducible across machines.
    """
    version = check_version(version)
    steps = DEFAULT_STEPS[version] if steps is None else steps
    with _torch_threads(num_threads):
        return _train(
            resolution,
            num_frames,
            num_classes,
            steps,
            seed,
            batch_size,
            lr,
            feature_dim,
            width,
            max_objects,
            speed,
            num_val,
            augment,
            log_every,
            version,
        )


def check_version(version) -> int:
    if version not in NETS:
        raise ValueError(f"unknown motion net version {version!r}; choose one of {sorted(NETS)}")
    return int(version)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


def _train(
    resolution,
    num_frames,
    num_classes,
    steps,
    seed,
    batch_size,
    lr,
    feature_dim,
    width,
    max_objects,
    speed,
    num_val,
    augment,
    log_every,
    version,
) -> tuple[MotionFeatureNet, dict]:
    if not 1 <= num_classes <= len(MOTION_TYPES):
        raise ValueError(f"num_classes must be in [1, {len(MOTION_TYPES)}], got {num_classes}")
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    h, w = as_size(resolution)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, caller's RNG untouched
        torch.manual_seed(seed)
        net = NETS[version](feature_dim=feature_dim, num_classes=num_classes, width=width)
    gen = torch.Generator().manual_seed(seed)  # augmentation (and v2's degradations)
    common = dict(
        resolution=(h, w),
        num_frames=num_frames,
        num_classes=num_classes,
        max_objects=max_objects,
        speed=tuple(speed),
    )
    train_set = SyntheticVideoDataset(steps * batch_size, seed=TRAIN_SEED_BASE + seed, **common)
    val_set = SyntheticVideoDataset(max(num_val, 1), seed=VAL_SEED_BASE + seed, **common)

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    losses: list[float] = []
    net.train()
    t0 = time.perf_counter()
    for step in range(steps):
        videos, labels = _clips(train_set, step * batch_size, batch_size)
        if augment:
            videos = _augment(videos, gen)
        if version == 2:
            assert isinstance(net, MotionFeatureNetV2)  # NETS[2]
            loss = _v2_loss(net, videos, labels, gen)
        else:
            loss = F.cross_entropy(net(videos)[1], labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"motion net step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.4f}")
    train_seconds = time.perf_counter() - t0
    accuracy = _accuracy(net, val_set, 2 * batch_size)
    net.eval()
    info = {
        "name": net.name,
        "version": version,
        "arch_version": _ARCH_VERSION[version],
        "settings": net_settings(
            h,
            w,
            num_frames,
            num_classes,
            steps,
            seed,
            batch_size,
            lr,
            feature_dim,
            width,
            max_objects,
            speed,
            num_val,
            augment,
            version,
        ),
        "heldout_accuracy": accuracy,
        "train_seconds": round(train_seconds, 2),
        "final_loss": float(np.mean(losses[-max(1, steps // 10) :])),
        "losses": losses,
    }
    return net, info


TRAIN_PARAMS = inspect.signature(train_motion_net).parameters


def net_settings(
    h,
    w,
    num_frames,
    num_classes,
    steps,
    seed,
    batch_size,
    lr,
    feature_dim,
    width,
    max_objects,
    speed,
    num_val,
    augment,
    version,
) -> dict:
    settings = {
        "resolution": [int(h), int(w)],
        "num_frames": int(num_frames),
        "num_classes": int(num_classes),
        "steps": int(steps),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "feature_dim": int(feature_dim),
        "width": int(width),
        "max_objects": int(max_objects),
        "speed": [float(speed[0]), float(speed[1])],
        "num_val": int(num_val),
        "augment": bool(augment),
        "arch_version": _ARCH_VERSION[version],
    }
    if version != 1:  # v1's settings (and so its cache file names) stay as they always were
        settings["version"] = version
    return settings
