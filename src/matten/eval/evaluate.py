"""Evaluate a checkpoint: sample clips, extract features, Fréchet distance against real clips.

    real clips  --extractor-->  features + stats (cached .npz, keyed by data / size / frames /
                                clips / net)
    samples     --extractor-->  features + stats (clips kept in <output>/generated/ so a run
                                resumes; features in <output>/generated_features.npz)
                 -> FD (the report's value), FD_inf, KID, precision/recall
                 -> <output>/report.json + <output>/comparison.gif

The sampled clips are keyed by everything that determines them (:func:`sample_key`: the
checkpoint's content, weights, sampler settings, seed, clip count, batch size, clip size), stored
in ``generated/key.json``: a folder holding clips of another key is refused (or, with
``overwrite``, emptied), never mixed in. The default output, ``<run>/eval/step_XXXXXXX-<key>``,
is one folder per checkpoint and settings.

The extractor is I3D when a weight file is given (``i3d_torchscript.pt``: FVD as StyleGAN-V
computes it), else the offline motion feature net (:mod:`.motion_net`, version 2 unless asked
otherwise), trained once on the synthetic set and cached: its distance is labelled
``fd-matten-motion-net-v2`` and is not comparable with published FVD. Both real and generated
clips are quantised to uint8 first, as decoded video is. KID, precision/recall and FD_inf
(:mod:`.metrics`) are computed in the same features; FVD itself is computed as always.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import config_from_checkpoint, load_for_sampling
from ..data import (
    atomic_write_path,
    dataset_from_config,
    tile_videos,
    upscale_frames,
    video_to_uint8,
    write_video,
)
from ..devices import resolve_device
from ..pipelines import sample_videos
from .frechet import FeatureStats, FeatureStatsAccumulator, cached_stats, frechet_distance
from .i3d_loading import load_i3d
from .metrics import quality_metrics
from .motion_features import MotionFeatureExtractor
from .samples import GeneratedClips, default_output, key_digest, sample_key

__all__ = [
    "EvalSettings",
    "evaluate",
    "build_extractor",
    "real_clips",
    "uint8_to_model_input",
    "clip_features",
]

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    num_clips: int = 2048  # the StyleGAN-V protocol: 2048 clips of 16 frames
    batch_size: int = 16  # clips sampled per shard (one model call)
    sampler: str | None = None  # None: the run's sample.sampler
    steps: int | None = None
    eta: float = 0.0
    cfg_scale: float | None = None  # None: the run's sample.cfg_scale (conditional models)
    seed: int = 0
    weights: str = "ema"
    grid_clips: int = 8  # clips of each kind in the side-by-side comparison


def uint8_to_model_input(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, F, H, W, 3)`` -> float ``(N, 3, F, H, W)`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3).float()
    return x / 127.5 - 1.0


def clip_features(extractor, clips: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Features ``(N, D)`` of uint8 clips ``(N, F, H, W, 3)``."""
    out = [
        extractor(uint8_to_model_input(clips[i : i + batch_size]))
        for i in range(0, len(clips), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, extractor.feature_dim))


def build_extractor(
    i3d_path=None,
    cache_dir=None,
    resolution=16,
    num_frames: int = 8,
    device="cpu",
    motion_net_version: int | None = None,
):
    """I3D from ``i3d_path`` (see :func:`matten.eval.i3d_loading.load_i3d`), else the offline motion
    net for this clip size (trained on the synthetic set on first use, then cached), of
    ``motion_net_version`` (default :data:`matten.eval.motion_net.DEFAULT_VERSION`)."""
    if i3d_path is not None:
        return load_i3d(i3d_path, device=device)
    version = {} if motion_net_version is None else {"version": motion_net_version}
    return MotionFeatureExtractor.load_or_train(
        cache_dir, resolution, num_frames, device=device, **version
    )


class SizedDataset(Protocol):
    """A map-style dataset with a length: what :func:`dataset_from_config` builds."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def real_clips(dataset, num_clips: int, progress: bool = False):
    """Yield uint8 batches ``(b, F, H, W, 3)`` of ``num_clips`` real clips: evenly spread over the
    dataset, or every item and then more passes (new epochs: new clip starts) when it is small."""
    n = len(dataset)
    if n == 0:
        raise ValueError("the evaluation dataset is empty")
    if num_clips <= n:
        order = [(0, int(i)) for i in np.linspace(0, n - 1, num_clips).round()]
    else:
        order = [divmod(k, n) for k in range(num_clips)]
    batch = []
    for epoch, index in tqdm(order, desc="real clips", disable=not progress, unit="clip"):
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        batch.append(video_to_uint8(dataset[index]["video"]))
        if len(batch) == 64:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def _sample_shard(
    loaded, shard: int, size: int, settings: EvalSettings, sampler: str, cfg_scale: float, device
) -> tuple[np.ndarray, torch.Tensor | None]:
    labels = None
    if loaded.num_classes:
        first = shard * settings.batch_size
        labels = (torch.arange(first, first + size) % loaded.num_classes).long()
    videos = sample_videos(
        loaded.model,
        loaded.autoencoder,
        size,
        loaded.num_frames,
        loaded.latent_size,
        labels=labels,
        sampler=sampler,
        steps=settings.steps,
        eta=settings.eta,
        cfg_scale=cfg_scale if labels is not None else 1.0,
        seed=settings.seed * 1_000_003 + shard,
        learn_sigma=loaded.learn_sigma,
        diffusion_steps=loaded.diffusion_steps,
        prediction=loaded.prediction,
        schedule=loaded.schedule,
        device=device,
    )
    return video_to_uint8(videos), labels


def _comparison(real: np.ndarray, fake: np.ndarray, path: Path, fps: int) -> Path:
    """Real clips on the top row, generated clips below, as one video."""
    k = min(len(real), len(fake))
    if k == 0:
        return path
    clips = upscale_frames(np.concatenate([real[:k], fake[:k]]), 64)
    return write_video(path, tile_videos(clips, columns=k), fps=fps)


# Data drawn by code rather than read from disk: any number of distinct clips can be asked for.
PROCEDURAL_DATASETS = ("synthetic", "moving_digits")


def _save_features(path: Path, features: np.ndarray, extractor_name: str) -> None:
    """The generated clips' features, so KID, precision/recall (or anything else) can be
    computed again without the network."""
    with atomic_write_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=features, extractor=np.array(extractor_name))


def _quality_fields(quality: dict) -> dict:
    """The report's metric fields, in reading order: the plain FD first (for I3D that is FVD,
    the report's value), then its extrapolation, KID, precision/recall, counts and the warning."""
    fields = (
        "fd",
        "fd_inf",
        "kid",
        "precision",
        "recall",
        "pr_k",
        "num_real_clips",
        "num_generated_clips",
        "warning",
        "fd_inf_fit",
    )
    out = {name: quality[name] for name in fields}
    out["metric_notes"] = quality["notes"]
    return out


def _real_statistics(
    dataset, data, settings: EvalSettings, extractor, cache_dir, progress
) -> tuple[FeatureStats, list[np.ndarray]]:
    """Features and statistics of the real clips, computed once per (data, clip size, clip count,
    extractor) and cached; with a few of the clips for the comparison video (none when cached)."""
    key = {
        "data": data.name,
        "root": str(data.root),
        "split": str(data.split),
        "options": data.options,
        "num_videos": data.num_videos,
        "resolution": data.resolution,
        "frames": data.num_frames,
        "stride": data.frame_stride,
        "clips": settings.num_clips,
        "extractor": extractor.cache_name,
    }
    preview: list[np.ndarray] = []

    def compute() -> FeatureStats:
        acc, features = FeatureStatsAccumulator(), []
        for clips in real_clips(dataset, settings.num_clips, progress):
            if len(preview) < settings.grid_clips:
                preview.append(clips[: settings.grid_clips])
            features.append(clip_features(extractor, clips))
            acc.update(features[-1])
        stats = acc.stats()
        stats.features = np.concatenate(features)  # for KID and precision/recall
        return stats

    return cached_stats(cache_dir, key, compute, need_features=True), preview


def _generated_statistics(
    store: GeneratedClips,
    loaded,
    settings: EvalSettings,
    sampler: str,
    cfg_scale: float,
    device,
    extractor,
    progress,
):
    """Sample the missing shards (the others are read back), then the generated clips'
    statistics and features; returns (stats, features, a few clips, shards resumed)."""
    acc, resumed, features = FeatureStatsAccumulator(), 0, []
    preview: list[np.ndarray] = []
    for shard in tqdm(range(store.num_shards), desc="sampling", disable=not progress, unit="batch"):
        clips = store.load(shard)
        if clips is None:
            clips, labels = _sample_shard(
                loaded, shard, store.shard_size(shard), settings, sampler, cfg_scale, device
            )
            store.save(shard, clips, labels)
        else:
            resumed += 1
        if sum(map(len, preview)) < settings.grid_clips:
            preview.append(clips)
        features.append(clip_features(extractor, clips))
        acc.update(features[-1])
    return acc.stats(), np.concatenate(features), preview, resumed


def evaluate(
    checkpoint,
    output=None,
    data=None,
    settings: EvalSettings | None = None,
    i3d=None,
    cache_dir=None,
    device=None,
    progress: bool = True,
    extractor=None,
    overwrite: bool = False,
    motion_net_version: int | None = None,
) -> dict:
    """Evaluate ``checkpoint`` into the folder ``output``; returns the report (also written to
    ``output/report.json``).

    ``output`` defaults to :func:`default_output` (``<run>/eval/step_XXXXXXX-<key>``). An
    ``output`` whose ``generated/`` holds clips sampled with another :func:`sample_key` raises
    :class:`SamplesMismatchError` naming the differences, unless ``overwrite`` (then they are
    deleted and sampled again).
    ``data`` is a :class:`matten.config.DataConfig` for the real clips (default: the run's own
    data config). ``i3d`` is a local I3D weight file (default: the offline motion net).
    ``cache_dir`` holds feature statistics and the motion net (default ``output/cache``, or
    ``<run>/eval/cache`` with the default ``output``, shared by the run's evaluations).
    ``extractor`` replaces the feature network (any callable with ``name``, ``cache_name``,
    ``feature_dim`` and ``comparable_to_published``); ``motion_net_version`` picks the offline
    motion net's version (default the newest).
    """
    settings = settings or EvalSettings()
    if settings.num_clips < 2:
        raise ValueError("--num-clips must be >= 2 (a covariance needs two clips)")
    if settings.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    device = resolve_device(device)
    start = time.time()

    loaded = load_for_sampling(checkpoint, weights=settings.weights, device=device)
    run = config_from_checkpoint(loaded.folder)
    data = data or run.data
    if data.name in PROCEDURAL_DATASETS and data.num_videos < settings.num_clips:
        data.num_videos = settings.num_clips  # one distinct clip each
    if (data.num_frames, data.resolution) != (loaded.num_frames, run.data.resolution):
        raise ValueError(
            f"the real clips ({data.num_frames} frames at {data.resolution}px) "
            f"must match the model's ({loaded.num_frames} frames at "
            f"{run.data.resolution}px)"
        )
    sampler = settings.sampler or run.sample.sampler
    cfg_scale = settings.cfg_scale if settings.cfg_scale is not None else run.sample.cfg_scale
    if not loaded.num_classes:
        cfg_scale = 1.0  # no guidance without classes: the scale changes nothing

    # The sampled clips' folder, claimed for their key before any slow work.
    key = sample_key(
        loaded.folder,
        settings.weights,
        loaded.step,
        sampler,
        cfg_scale,
        settings,
        loaded.num_frames,
        run.data.resolution,
    )
    if output is None:
        output = default_output(loaded.folder, key)
        if cache_dir is None:
            cache_dir = output.parent / "cache"
    output = Path(output)
    cache_dir = Path(cache_dir) if cache_dir is not None else output / "cache"
    store = GeneratedClips(output / "generated", settings.num_clips, settings.batch_size, key)
    store.claim(overwrite)

    if extractor is None:
        extractor = build_extractor(
            i3d,
            cache_dir,
            data.resolution,
            data.num_frames,
            device,
            motion_net_version=motion_net_version,
        )
    metric = "fvd" if extractor.comparable_to_published else f"fd-{extractor.name}"

    dataset = cast(SizedDataset, dataset_from_config(data, seed=0))  # every one has a length
    real, preview_real = _real_statistics(dataset, data, settings, extractor, cache_dir, progress)
    fake, fake_features, preview_fake, resumed = _generated_statistics(
        store, loaded, settings, sampler, cfg_scale, device, extractor, progress
    )
    distance = frechet_distance(real.mean, real.cov, fake.mean, fake.cov)
    _save_features(output / "generated_features.npz", fake_features, extractor.cache_name)
    quality = quality_metrics(
        real.features, fake_features, fd=distance, i3d=bool(extractor.comparable_to_published)
    )

    if not preview_real:  # the real statistics came from the cache: read a few clips again
        preview_real = [next(real_clips(dataset, min(settings.grid_clips, len(dataset))))]
    comparison = _comparison(
        np.concatenate(preview_real)[: settings.grid_clips],
        np.concatenate(preview_fake)[: settings.grid_clips],
        output / "comparison.gif",
        run.sample.fps,
    )
    report = {
        "metric": metric,
        "value": distance,
        **_quality_fields(quality),
        "comparable_to_published_fvd": bool(extractor.comparable_to_published),
        "extractor": extractor.cache_name,
        "feature_dim": int(extractor.feature_dim),
        "checkpoint": str(loaded.folder),
        "step": loaded.step,
        "weights": settings.weights,
        "num_clips": settings.num_clips,
        "num_frames": loaded.num_frames,
        "resolution": run.data.resolution,
        "sampler": sampler,
        "steps": settings.steps,
        "eta": settings.eta,
        "cfg_scale": cfg_scale,
        "seed": settings.seed,
        "data": {"name": data.name, "root": data.root, "split": data.split},
        "shards_resumed": resumed,
        "shards_total": store.num_shards,
        "output": str(output),
        "samples_key": key,
        "samples_key_hash": key_digest(key),
        "comparison": str(comparison),
        "seconds": round(time.time() - start, 1),
    }
    if not extractor.comparable_to_published:
        report["note"] = (
            f"Fréchet distance in the features of Matten's offline motion network "
            f"({extractor.name}) trained on the synthetic set; not comparable "
            "with published FVD"
        )
    with atomic_write_path(output / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    return report
