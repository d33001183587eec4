"""Training the motion feature networks of :mod:`.motion_net` on the built-in synthetic clips.

v1 learns the motion class; v2 also learns which degradation a clip went through and how strong
it was (:mod:`.degradations`). Clips come from seed ranges of their own (``TRAIN_SEED_BASE``,
``VAL_SEED_BASE`` in :mod:`.motion_net`), so training never sees an evaluation clip.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..data.synthetic import MOTION_TYPES, SyntheticVideoDataset
from ..data.transforms import as_size
from .degradations import DEGRADATIONS, degrade
from .motion_net import (
    ARCH_VERSIONS,
    DEFAULT_SPEED,
    DEFAULT_STEPS,
    DEFAULT_VERSION,
    NETS,
    TRAIN_SEED_BASE,
    VAL_SEED_BASE,
    MotionFeatureNet,
    MotionFeatureNetV2,
    check_version,
)

__all__ = ["TRAIN_PARAMS", "net_settings", "train_motion_net"]


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
        "arch_version": ARCH_VERSIONS[version],
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
        "arch_version": ARCH_VERSIONS[version],
    }
    if version != 1:  # v1's settings (and so its cache file names) stay as they always were
        settings["version"] = version
    return settings
