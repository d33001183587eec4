"""Video clip datasets: any folder of videos or frame folders (the benchmark layouts build on it
in :mod:`.benchmarks`; datasets by name are :mod:`.registry`).

Every dataset yields ``{"video": float (C, F, H, W) in [-1, 1], "label": int64 scalar tensor}``
(label 0 when unlabelled). Videos that cannot be read or are too short for one clip are skipped
when the dataset is indexed (one warning; ``dataset.skipped`` maps each reason to the paths,
``dataset.skipped_rows()`` lists them); a video that fails to decode later is recorded the same
way and replaced by the next good one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import CLIP_STARTS, VideoTransform, as_size, clip_span, sample_clip_indices
from .video_read import (
    VIDEO_EXTENSIONS,
    ShortVideoError,
    VideoDecodeError,
    count_frames,
    is_image_file,
    natural_key,
    read_video,
)

logger = logging.getLogger(__name__)


# Why a video was left out (the keys of ``dataset.skipped``), in words.
SKIP_REASONS = {
    "corrupt": "corrupt",
    "too_short": "too short",
    "decode_error": "failed to decode",
    "no_class_folder": "not in a class folder",
    "missing": "listed in the split but missing",
    "no_group": "no UCF101 group in the name",
}


@dataclass(frozen=True)
class VideoEntry:
    """One indexed video: a file or a frame folder, its label and its frame count."""

    path: str
    label: int = 0
    num_frames: int = 0


# ----------------------------------------------------------------------------------------------
# discovery


def check_root(root) -> Path:
    if root is None:
        raise ValueError("a dataset root folder is required")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset root '{root}' does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root '{root}' is not a folder")
    return root


def find_videos(
    root, extensions: Sequence[str] = VIDEO_EXTENSIONS, recursive: bool = True
) -> list[Path]:
    """Video files and frame folders under ``root``, in natural order of their relative paths.

    A folder that directly contains image files counts as one video (its images are the frames).
    Hidden files and folders (names starting with ``.``) are ignored.
    """
    root = check_root(root)
    exts = tuple(e.lower() for e in extensions)
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if not recursive:
            dirnames[:] = []
        here = Path(dirpath)
        if any(is_image_file(f) for f in filenames):
            found.append(here)
        found.extend(
            here / f
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts
        )
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def split_root(root, split: str | None, aliases: Sequence[str] = ()) -> Path:
    """``root/<split>`` (or ``root/<alias>``) when such a subfolder exists, else ``root``."""
    root = check_root(root)
    if split is None:
        return root
    for name in (split, *[a.format(split=split) for a in aliases]):
        if (root / name).is_dir():
            return root / name
    logger.warning("no '%s' subfolder under '%s'; using every video under it", split, root)
    return root


# ----------------------------------------------------------------------------------------------
# the generic dataset


class VideoClipDataset(Dataset):
    """Clips from a folder tree of videos (.mp4 .avi .mov .mkv .webm) and/or frame folders.

    Args:
        root: the folder to search (recursively) unless ``videos`` is given.
        resolution: output size, an int (square) or ``(H, W)``.
        num_frames, frame_stride: clip length and the step between its frames in the source.
        videos: explicit list of paths or ``(path, label)`` pairs instead of searching ``root``.
        class_names: names of the labels (``num_classes = len(class_names)``); ``None`` or
            empty for unlabelled data (every label is 0).
        labels_from_folders: label each video by its top-level folder under ``root`` (classes
            sorted alphabetically, case-insensitively); videos directly in ``root`` are skipped.
        clip_start: ``"random"`` (training), ``"first"`` or ``"center"``.
        hflip_p: probability of mirroring a clip (0 for evaluation).
        seed: makes the random clip start and flip a function of (seed, epoch, index).
        index_workers: threads used to read frame counts when indexing.
    """

    def __init__(
        self,
        root,
        resolution,
        num_frames: int = 16,
        frame_stride: int = 3,
        *,
        videos: Sequence | None = None,
        class_names: Sequence[str] | None = None,
        labels_from_folders: bool = False,
        clip_start: str = "random",
        hflip_p: float = 0.5,
        seed: int | None = None,
        index_workers: int = 8,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        name: str | None = None,
        skipped: dict[str, list[str]] | None = None,
    ):
        self.root = Path(root) if root is not None else None
        self.resolution = as_size(resolution)
        self.num_frames, self.frame_stride = int(num_frames), int(frame_stride)
        self.span = clip_span(self.num_frames, self.frame_stride)
        if clip_start not in CLIP_STARTS:
            raise ValueError(f"clip_start must be one of {CLIP_STARTS}, got {clip_start!r}")
        self.clip_start = clip_start
        self.transform = VideoTransform(self.resolution, hflip_p)
        self.seed, self.epoch = seed, 0
        self.name = name or type(self).__name__
        self.skipped: dict[str, list[str]] = {k: list(v) for k, v in (skipped or {}).items()}

        if videos is None:
            root = check_root(root)
            paths = find_videos(root, extensions)
            if not paths:
                raise ValueError(
                    f"{self.name}: no videos ({' '.join(extensions)}) or frame "
                    f"folders found under '{root}'"
                )
            if labels_from_folders:
                videos, class_names = self._label_by_folder(root, paths, class_names)
            else:
                videos = paths
        pairs = [
            (str(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (str(v), 0) for v in videos
        ]
        if not pairs:
            raise ValueError(f"{self.name}: no videos to index under '{root}'")
        self.class_names = list(class_names or [])
        self.num_classes = len(self.class_names)
        for path, label in pairs:
            if self.num_classes and not 0 <= label < self.num_classes:
                raise ValueError(
                    f"{self.name}: label {label} of '{path}' is outside [0, {self.num_classes})"
                )
        self.entries = self._index(pairs, index_workers)
        self._bad: set[int] = set()

    # -- indexing --------------------------------------------------------------------------

    def _label_by_folder(self, root: Path, paths: list[Path], class_names):
        top = [p.relative_to(root).parts for p in paths]
        if class_names is None:
            class_names = sorted({t[0] for t in top if len(t) > 1}, key=lambda s: (s.lower(), s))
        index = {c: i for i, c in enumerate(class_names)}
        videos = []
        for p, t in zip(paths, top, strict=True):
            if len(t) > 1 and t[0] in index:
                videos.append((p, index[t[0]]))
            else:
                self.skipped.setdefault("no_class_folder", []).append(str(p))
        return videos, class_names

    def _index(self, pairs, workers: int) -> list[VideoEntry]:
        def probe(item):
            try:
                return item, count_frames(item[0]), None
            except VideoDecodeError as exc:
                return item, 0, exc

        if workers > 1 and len(pairs) > 1:
            with ThreadPoolExecutor(max_workers=min(workers, len(pairs))) as pool:
                results = list(pool.map(probe, pairs))
        else:
            results = [probe(p) for p in pairs]
        entries = []
        for (path, label), n, exc in results:
            if exc is not None:
                self.skipped.setdefault("corrupt", []).append(path)
            elif n < self.span:
                self.skipped.setdefault("too_short", []).append(path)
            else:
                entries.append(VideoEntry(path, label, n))
        n_skipped = sum(len(v) for v in self.skipped.values())
        if n_skipped:
            logger.warning(
                "%s (%s): skipped %d of %d videos (%s)",
                self.name,
                self.root,
                n_skipped,
                n_skipped + len(entries),
                self.skipped_summary(),
            )
        if not entries:
            raise ValueError(
                f"{self.name}: none of the {len(pairs)} videos under '{self.root}' "
                f"is usable ({self.skipped_summary()})"
            )
        return entries

    def skipped_summary(self) -> str:
        """The skipped videos counted by reason, e.g. ``corrupt: 2, too short: 1 (a clip of
        16 frames at stride 3 needs 46 frames)``."""
        parts = []
        for reason, paths in self.skipped.items():
            text = f"{SKIP_REASONS.get(reason, reason)}: {len(paths)}"
            if reason == "too_short":
                text += (
                    f" (a clip of {self.num_frames} frames at stride {self.frame_stride} "
                    f"needs {self.span} frames)"
                )
            parts.append(text)
        return ", ".join(parts)

    def skipped_rows(self) -> list[tuple[str, str]]:
        """Every skipped video as ``(reason, path)``, in the order they were found."""
        return [(reason, path) for reason, paths in self.skipped.items() for path in paths]

    # -- items -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """With a ``seed``, choose different (still reproducible) clips in each epoch."""
        self.epoch = int(epoch)

    def _generator(self, index: int) -> torch.Generator | None:
        if self.seed is None:
            return None  # torch's global RNG (seeded per DataLoader worker)
        state = np.random.SeedSequence([int(self.seed), self.epoch, index]).generate_state(1)
        return torch.Generator().manual_seed(int(state[0]))

    def _load(self, index: int) -> dict:
        entry = self.entries[index]
        gen = self._generator(index)
        indices = sample_clip_indices(
            entry.num_frames, self.num_frames, self.frame_stride, self.clip_start, gen
        )
        try:
            frames = read_video(entry.path, indices)
        except ShortVideoError as exc:  # the metadata over-counted; use the frames that exist
            if exc.available < self.span:
                raise
            indices = sample_clip_indices(
                exc.available, self.num_frames, self.frame_stride, self.clip_start, gen
            )
            frames = read_video(entry.path, indices)
        return {
            "video": self.transform(frames, gen),
            "label": torch.tensor(entry.label, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> dict:
        n = len(self.entries)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} of length {n}")
        index %= n
        last_error = None
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                return self._load(i)
            except VideoDecodeError as exc:
                self._bad.add(i)
                self.skipped.setdefault("decode_error", []).append(self.entries[i].path)
                logger.warning(
                    "%s: skipping '%s' (%s)", self.name, self.entries[i].path, exc.reason
                )
                last_error = exc
        raise RuntimeError(
            f"{self.name}: every one of the {n} videos under '{self.root}' failed "
            f"to decode (last error: {last_error})"
        )

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    def __repr__(self):
        return (
            f"{self.name}(root='{self.root}', videos={len(self)}, classes={self.num_classes}, "
            f"resolution={self.resolution}, num_frames={self.num_frames}, "
            f"frame_stride={self.frame_stride}, "
            f"skipped={sum(map(len, self.skipped.values()))})"
        )
