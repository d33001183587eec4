"""Datasets by name: the registry, aliases, and building the dataset a data config describes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from .benchmarks import (
    FaceForensicsDataset,
    FolderDataset,
    SkyTimelapseDataset,
    TaichiHDDataset,
    UCF101Dataset,
)
from .long_memory import ACTION_NAMES, PanningMapDataset
from .moving_digits import build_moving_digits
from .synthetic import SyntheticVideoDataset

__all__ = [
    "DATASETS",
    "build_dataset",
    "dataset_key",
    "dataset_from_config",
    "action_names",
    "clip_actions",
]


def _build_synthetic(root, resolution, num_frames=16, frame_stride=3, split=None, **kwargs):
    kwargs.setdefault("num_videos", 512)
    if split == "test":  # a disjoint, equally reproducible set of items
        kwargs["seed"] = int(kwargs.get("seed", 0)) + 1_000_003
    return SyntheticVideoDataset(resolution=resolution, num_frames=num_frames, **kwargs)


def _build_panning_map(root, resolution, num_frames=16, frame_stride=3, split=None, **kwargs):
    kwargs.setdefault("num_videos", 512)
    if split == "test":
        kwargs["seed"] = int(kwargs.get("seed", 0)) + 1_000_003
    return PanningMapDataset(resolution=resolution, num_frames=num_frames, **kwargs)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "ucf101": UCF101Dataset,
    "sky_timelapse": SkyTimelapseDataset,
    "faceforensics": FaceForensicsDataset,
    "taichi_hd": TaichiHDDataset,
    "folder": FolderDataset,
    "synthetic": _build_synthetic,
    "panning_map": _build_panning_map,
    "moving_digits": build_moving_digits,
}
_ALIASES = {
    "ucf": "ucf101",
    "sky": "sky_timelapse",
    "skytimelapse": "sky_timelapse",
    "ffs": "faceforensics",
    "face_forensics": "faceforensics",
    "taichi": "taichi_hd",
    "taichihd": "taichi_hd",
    "videos": "folder",
}


def dataset_key(name: str) -> str:
    """The registry key of a dataset name or alias (``"UCF"`` -> ``"ucf101"``)."""
    key = str(name).lower().replace("-", "_")
    return _ALIASES.get(key, key)


def build_dataset(
    name: str,
    root,
    resolution,
    num_frames: int = 16,
    frame_stride: int = 3,
    split: str | None = None,
    **kwargs,
) -> Dataset:
    """Build a dataset by name: ``ucf101``, ``sky_timelapse``, ``faceforensics``, ``taichi_hd``,
    ``folder`` or ``synthetic`` (``root`` is ignored; pass ``num_videos``, ``num_classes``,
    ``seed``). Extra keyword arguments go to the dataset class."""
    key = dataset_key(name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; choose one of {sorted(DATASETS)}")
    if key in ("synthetic", "panning_map"):
        return DATASETS[key](root, resolution, num_frames, frame_stride, split, **kwargs)
    return DATASETS[key](root, resolution, num_frames, frame_stride, split=split, **kwargs)


def dataset_from_config(cfg, seed: int = 0) -> Dataset:
    """The dataset a data config describes (a :class:`matten.config.DataConfig`, or anything
    with its fields: name, root, resolution, num_frames, frame_stride, split, num_videos,
    num_classes, hflip, options)."""
    kwargs = dict(cfg.options)
    key = dataset_key(cfg.name)
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset data.name={cfg.name!r}; choose one of {', '.join(sorted(DATASETS))}"
        )
    if key == "synthetic":
        kwargs.setdefault("num_videos", cfg.num_videos)
        kwargs.setdefault("num_classes", cfg.num_classes)
    elif key == "panning_map":  # built in, unlabelled (its camera moves are per-frame actions)
        kwargs.setdefault("num_videos", cfg.num_videos)
    elif key == "moving_digits":  # built in from scikit-learn's digits, labelled by digit
        kwargs.setdefault("num_videos", cfg.num_videos)
    else:
        if cfg.root is None:
            raise FileNotFoundError(
                f"data.root is required for the '{cfg.name}' dataset: set it "
                "to the dataset folder (data.root=/path/to/videos)"
            )
        kwargs.setdefault("hflip_p", cfg.hflip)
        kwargs.setdefault("seed", seed)  # clip starts and flips are a function of (seed, epoch)
    return build_dataset(
        cfg.name,
        cfg.root,
        cfg.resolution,
        num_frames=cfg.num_frames,
        frame_stride=cfg.frame_stride,
        split=cfg.split,
        **kwargs,
    )


# Names of the discrete per-frame actions of the datasets that have them.
_ACTION_NAMES = {"panning_map": ACTION_NAMES}


def action_names(dataset_name: str) -> tuple[str, ...]:
    """The names of a dataset's discrete actions (empty when it has none or they are unnamed)."""
    return tuple(_ACTION_NAMES.get(dataset_key(dataset_name), ()))


def clip_actions(dataset, num_samples: int) -> torch.Tensor | None:
    """The per-frame actions of the first ``num_samples`` clips of ``dataset`` (the camera moves
    of the panning-map set), for sampling an action-conditioned model; None if it has none."""
    if "actions" not in dataset[0]:
        return None
    return torch.stack([dataset[i % len(dataset)]["actions"] for i in range(num_samples)])
