"""Reading videos: PyAV for video files, Pillow for GIFs and frame folders.

Frames are always ``uint8`` arrays of shape ``(T, H, W, 3)`` (RGB). Writing is
:mod:`matten.data.video_write`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Container suffix -> (PyAV format name, encoders to try in order).
CONTAINERS = {
    ".mp4": ("mp4", ("libx264", "h264", "mpeg4")),
    ".m4v": ("mp4", ("libx264", "h264", "mpeg4")),
    ".mov": ("mov", ("libx264", "h264", "mpeg4")),
    ".mkv": ("matroska", ("libx264", "h264", "mpeg4")),
    ".avi": ("avi", ("mpeg4",)),
    ".webm": ("webm", ("libvpx-vp9", "libvpx")),
}


class VideoDecodeError(RuntimeError):
    """A video file or frame folder that cannot be read."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot read video '{self.path}': {self.reason}")

    def __reduce__(self):  # keep picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


class ShortVideoError(VideoDecodeError):
    """Fewer frames could be decoded than were asked for; ``available`` says how many there are."""

    def __init__(self, path, reason: str, available: int = 0):
        self.available = int(available)
        super().__init__(path, reason)

    def __reduce__(self):
        return (type(self), (self.path, self.reason, self.available))


# ----------------------------------------------------------------------------------------------
# helpers


def natural_key(name: str):
    """Sort key that orders embedded numbers numerically: ``frame_2`` before ``frame_10``."""
    return [
        (0, int(tok), "") if tok.isdigit() else (1, 0, tok.lower())
        for tok in re.split(r"(\d+)", str(name))
        if tok != ""
    ]


def is_video_file(path) -> bool:
    path = Path(path)
    return path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")


def is_image_file(path) -> bool:
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_frame_files(folder) -> list[Path]:
    """The image files directly inside ``folder``, sorted naturally (hidden files ignored)."""
    folder = Path(folder)
    try:
        names = [e.name for e in os.scandir(folder) if e.is_file() and is_image_file(e.name)]
    except OSError as exc:
        raise VideoDecodeError(folder, f"cannot list frame folder ({exc})") from exc
    return [folder / n for n in sorted(names, key=natural_key)]


def _check_indices(indices) -> list[int] | None:
    if indices is None:
        return None
    out = [int(i) for i in indices]
    if any(i < 0 for i in out):
        raise ValueError(f"frame indices must be non-negative, got {out}")
    return out


def _select(frames: list[np.ndarray], indices: list[int] | None, path) -> np.ndarray:
    if not frames:
        raise VideoDecodeError(path, "no frames could be decoded")
    if indices is None:
        return np.stack(frames)
    if max(indices) >= len(frames):
        raise ShortVideoError(
            path,
            f"needs frame {max(indices)} but only {len(frames)} frames could be decoded",
            available=len(frames),
        )
    return np.stack([frames[i] for i in indices])


# ----------------------------------------------------------------------------------------------
# reading


def read_video(path, indices: Sequence[int] | None = None) -> np.ndarray:
    """Decode a video file (or a frame folder) to ``uint8 (T, H, W, 3)``.

    With ``indices`` only those frames are returned (in the given order); decoding stops after the
    last one needed. Raises :class:`VideoDecodeError` when the file cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        return read_frame_folder(path, indices)
    if not path.exists():
        raise VideoDecodeError(path, "file does not exist")
    indices = _check_indices(indices)
    if path.suffix.lower() == ".gif":
        return _read_gif(path, indices)

    import av

    last = max(indices) if indices else None
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if last is not None and len(frames) > last:
                    break
    except VideoDecodeError:
        raise
    except Exception as exc:  # av.error.FFmpegError, OSError, ...
        # A stream that breaks after the frames we need is still usable; one that breaks
        # earlier reports how many frames it gave (a truncated file may still hold a clip).
        if not frames:
            raise VideoDecodeError(path, f"{type(exc).__name__}: {exc}") from exc
        if last is None or len(frames) <= last:
            raise ShortVideoError(
                path,
                f"decoding stopped after {len(frames)} frames ({type(exc).__name__}: {exc})",
                available=len(frames),
            ) from exc
    return _select(frames, indices, path)


def _read_gif(path: Path, indices: list[int] | None) -> np.ndarray:
    from PIL import Image, ImageSequence

    last = max(indices) if indices else None
    frames = []
    try:
        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                frames.append(np.asarray(frame.convert("RGB"), dtype=np.uint8).copy())
                if last is not None and len(frames) > last:
                    break
    except Exception as exc:
        raise VideoDecodeError(path, f"{type(exc).__name__}: {exc}") from exc
    return _select(frames, indices, path)


def read_frame_folder(path, indices: Sequence[int] | None = None) -> np.ndarray:
    """Read a folder of ``.jpg``/``.png`` frames (sorted naturally) to ``uint8 (T, H, W, 3)``."""
    from PIL import Image

    path = Path(path)
    if not path.is_dir():
        raise VideoDecodeError(path, "not a folder")
    files = list_frame_files(path)
    if not files:
        raise VideoDecodeError(path, "the folder contains no image frames")
    indices = _check_indices(indices)
    if indices is not None and max(indices) >= len(files):
        raise ShortVideoError(
            path,
            f"needs frame {max(indices)} but the folder has {len(files)} frames",
            available=len(files),
        )
    chosen = files if indices is None else [files[i] for i in indices]
    frames = []
    for f in chosen:
        try:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except Exception as exc:
            raise VideoDecodeError(
                path, f"cannot read frame '{f.name}' ({type(exc).__name__}: {exc})"
            ) from exc
        if frames[-1].shape != frames[0].shape:
            raise VideoDecodeError(
                path,
                f"frame '{f.name}' has size {frames[-1].shape[:2]}, "
                f"the first frame has {frames[0].shape[:2]}",
            )
    return np.stack(frames)


def count_frames(path) -> int:
    """Number of frames, cheaply: container metadata for video files, image count for folders.

    When the container does not store a frame count (common for .mkv/.webm), the packets are
    counted without decoding; if that also fails the video is decoded.
    """
    path = Path(path)
    if path.is_dir():
        return len(list_frame_files(path))
    if not path.exists():
        raise VideoDecodeError(path, "file does not exist")
    if path.suffix.lower() == ".gif":
        from PIL import Image

        try:
            with Image.open(path) as im:
                return int(getattr(im, "n_frames", 1))
        except Exception as exc:
            raise VideoDecodeError(path, f"{type(exc).__name__}: {exc}") from exc

    import av

    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "the file has no video stream")
            stream = container.streams.video[0]
            if stream.frames and stream.frames > 0:
                return int(stream.frames)
            n = sum(1 for p in container.demux(stream) if p.size > 0)
    except VideoDecodeError:
        raise
    except Exception as exc:
        raise VideoDecodeError(path, f"{type(exc).__name__}: {exc}") from exc
    if n > 0:
        return n
    return len(read_video(path))
