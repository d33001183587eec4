"""The offline motion feature network as a feature extractor: trained on first use, cached as
safetensors + JSON named by its version and settings, loaded after (:mod:`.motion_net` has the
networks and their training)."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data import atomic_write_path
from ..data.synthetic import MOTION_TYPES
from ..data.transforms import as_size
from .motion_net import (
    DEFAULT_STEPS,
    DEFAULT_VERSION,
    MOTION_NET_NAMES,
    NETS,
    MotionFeatureNet,
    check_version,
)
from .motion_training import TRAIN_PARAMS, net_settings, train_motion_net

__all__ = ["MotionFeatureExtractor", "load_or_train_motion_net", "motion_net_cache_paths"]


def motion_net_cache_paths(cache_dir, settings: dict) -> tuple[Path, Path]:
    """``(weights .safetensors, info .json)`` for a settings dict, named by the net's name
    (its version), resolution, frames, classes and a hash of all the settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    h, w = settings["resolution"]
    name = MOTION_NET_NAMES[settings.get("version", 1)]
    stem = f"{name}-r{h}x{w}-f{settings['num_frames']}-c{settings['num_classes']}-{digest}"
    cache_dir = Path(cache_dir)
    return cache_dir / f"{stem}.safetensors", cache_dir / f"{stem}.json"


def _load_cached(weights: Path, info_file: Path, settings: dict) -> tuple[MotionFeatureNet, dict]:
    info = json.loads(info_file.read_text())
    if info.get("settings") != settings:
        raise ValueError("its settings differ from the ones asked for")
    net = NETS[settings.get("version", 1)](**info["model"])
    net.load_state_dict(load_file(str(weights)))
    net.eval()
    return net, info


def load_or_train_motion_net(
    cache_dir,
    resolution=16,
    num_frames: int = 8,
    num_classes: int = len(MOTION_TYPES),
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    version: int = DEFAULT_VERSION,
    **train_kwargs,
) -> tuple[MotionFeatureNet, dict]:
    """Reuse the net cached in ``cache_dir`` for these settings, or train and cache it.

    The weights go to a ``.safetensors`` file and the settings, held-out accuracy and training
    time to a JSON file beside it, both written atomically (JSON last, so a JSON file always
    describes complete weights). A cache entry that cannot be read is retrained with a warning.
    """
    h, w = as_size(resolution)
    version = check_version(version)
    steps = DEFAULT_STEPS[version] if steps is None else steps
    params = TRAIN_PARAMS
    unknown = set(train_kwargs) - set(params)
    if unknown:
        raise TypeError(f"unknown motion net training options: {sorted(unknown)}")
    # The settings that change the weights (not num_threads/log_every) identify a cache entry.
    opts = {
        k: train_kwargs.get(k, params[k].default)
        for k in ("lr", "feature_dim", "width", "max_objects", "speed", "num_val", "augment")
    }
    settings = net_settings(
        h, w, num_frames, num_classes, steps, seed, batch_size, **opts, version=version
    )
    weights, info_file = motion_net_cache_paths(cache_dir, settings)
    if weights.exists() and info_file.exists():
        try:
            return _load_cached(weights, info_file, settings)
        except Exception as exc:  # any damage to a cache entry just means training again
            warnings.warn(
                f"cached motion net '{weights}' cannot be used ({exc}); retraining",
                RuntimeWarning,
                stacklevel=2,
            )

    net, info = train_motion_net(
        (h, w),
        num_frames,
        num_classes,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        version=version,
        **train_kwargs,
    )
    info = dict(info, model=net.config())
    saved = {k: v for k, v in info.items() if k != "losses"}
    with atomic_write_path(weights) as tmp:
        save_file(
            {k: v.detach().contiguous() for k, v in net.state_dict().items()},
            str(tmp),
            metadata={"name": net.name},
        )
    with atomic_write_path(info_file) as tmp:
        tmp.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return net, info


# ----------------------------------------------------------------------------------------------
# extractor


class MotionFeatureExtractor:
    """Videos ``(B, 3, F, H, W)`` in [-1, 1] -> ``(B, feature_dim)`` float64 features.

    ``name`` identifies the network and its version (``matten-motion-net-v1`` or ``-v2``);
    ``weights_id`` (a hash of the weights) tells apart
    nets trained with different settings, so use :attr:`cache_name` in feature-stats cache keys.
    """

    comparable_to_published = False

    def __init__(
        self, net: MotionFeatureNet, info: dict | None = None, device=None, batch_size: int = 64
    ):
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.net = net.to(self.device).eval()
        self.info = dict(info or {})
        self.batch_size = int(batch_size)
        self.name = net.name
        self.feature_dim = net.feature_dim
        digest = hashlib.sha256()
        for k, v in sorted(net.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().float().numpy().tobytes())
        self.weights_id = digest.hexdigest()[:12]

    @property
    def cache_name(self) -> str:
        return f"{self.name}-{self.weights_id}"

    @classmethod
    def load_or_train(
        cls, cache_dir, resolution=16, num_frames: int = 8, device=None, **kwargs
    ) -> MotionFeatureExtractor:
        """The cached (or newly trained) net for this clip size; ``version=1`` for the first
        version, other keywords as :func:`load_or_train_motion_net`."""
        net, info = load_or_train_motion_net(cache_dir, resolution, num_frames, **kwargs)
        return cls(net, info, device=device)

    @torch.no_grad()
    def __call__(self, videos) -> np.ndarray:
        if not torch.is_tensor(videos):
            videos = torch.as_tensor(np.asarray(videos))
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must have shape (B, 3, F, H, W), got {tuple(videos.shape)}")
        out = []
        for start in range(0, videos.shape[0], self.batch_size):
            chunk = videos[start : start + self.batch_size].to(self.device, torch.float32)
            out.append(self.net.features(chunk).double().cpu().numpy())
        if not out:
            return np.zeros((0, self.feature_dim), np.float64)
        return np.concatenate(out, axis=0)

    def __repr__(self):
        return (
            f"MotionFeatureExtractor({self.cache_name}, feature_dim={self.feature_dim}, "
            f"comparable_to_published=False)"
        )
