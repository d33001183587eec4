"""Reading and writing videos: PyAV for video files, Pillow for frame folders, GIFs and grids.

Frames are always ``uint8`` arrays of shape ``(T, H, W, 3)`` (RGB). Every writer is atomic: it
writes a hidden temporary file next to the target and renames it into place, so an existing file
is never left half-written or destroyed by a failed write.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

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
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok.lower())
            for tok in re.split(r"(\d+)", str(name)) if tok != ""]


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
        raise ShortVideoError(path, f"needs frame {max(indices)} but only {len(frames)} frames "
                                    "could be decoded", available=len(frames))
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
            raise ShortVideoError(path, f"decoding stopped after {len(frames)} frames "
                                        f"({type(exc).__name__}: {exc})",
                                  available=len(frames)) from exc
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
        raise ShortVideoError(path, f"needs frame {max(indices)} but the folder has "
                                    f"{len(files)} frames", available=len(files))
    chosen = files if indices is None else [files[i] for i in indices]
    frames = []
    for f in chosen:
        try:
            with Image.open(f) as im:
                frames.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
        except Exception as exc:
            raise VideoDecodeError(path, f"cannot read frame '{f.name}' "
                                         f"({type(exc).__name__}: {exc})") from exc
        if frames[-1].shape != frames[0].shape:
            raise VideoDecodeError(path, f"frame '{f.name}' has size {frames[-1].shape[:2]}, "
                                         f"the first frame has {frames[0].shape[:2]}")
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


# ----------------------------------------------------------------------------------------------
# writing

# About when this process started (this module is imported as a command starts): a temporary
# file of the older naming, without a process id, that has not changed since is a leftover.
_STARTED = time.time()

# What temp_file_beside puts between ".<name>." and ".tmp": "<pid>-<random>", or only the random
# part of tempfile.mkstemp in files written before the process id was part of the name.
_TEMP_OWNER = re.compile(r"(?:(\d+)-)?[a-z0-9_]{8}")


def temp_file_beside(path) -> Path:
    """Create an empty hidden temporary file next to ``path``: ``.<name>.<pid>-<random>.tmp``.

    The process id in the name lets :func:`remove_stale_temp_files` tell the leftover of a killed
    writer from a file another process is still writing.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True  # (off POSIX os.kill(pid, 0) would end the process, not probe it)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, it belongs to another user
        return True
    return True


def remove_stale_temp_files(path) -> list[Path]:
    """Delete the temporary files beside ``path`` that writers of it left when they were killed
    (``.<name>.<pid>-<random>.tmp``); returns the paths removed.

    A file is stale when its process id is no running process, or, for a file of the older
    naming without one, when it was last modified before this process started. Files of running
    processes (this one included) are kept. On a folder shared by several machines a file of a
    process on another machine looks stale: do not write the same output from two machines.
    """
    path = Path(path)
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        owner = _TEMP_OWNER.fullmatch(entry.name[len(prefix):-len(".tmp")])
        if owner is None:
            continue
        try:
            if owner.group(1) is not None:
                stale = not _process_alive(int(owner.group(1)))
            else:
                stale = entry.stat().st_mtime < _STARTED
            if stale:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # gone already, or not ours to delete
            continue
    return removed


@contextlib.contextmanager
def atomic_write_path(path) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``path``; on success it replaces ``path``.

    Parent folders are created. On any exception the temporary file is removed and an existing
    ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)
    try:
        yield tmp
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def as_uint8_frames(frames, what: str = "frames") -> np.ndarray:
    """Validate/convert to a contiguous ``uint8 (T, H, W, 3)`` array (gray is repeated to RGB)."""
    if hasattr(frames, "detach"):  # torch tensor
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames]) if len(frames) else np.zeros((0,))
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 in [0, 255], got dtype {frames.dtype} "
                         "(convert float videos in [-1, 1] with matten.data.video_to_uint8)")
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or 0 in frames.shape:
        raise ValueError(f"{what} must have shape (T, H, W, 3) with T, H, W > 0, "
                         f"got {tuple(frames.shape)}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames)


def available_encoder(candidates: Sequence[str]) -> str | None:
    """The first encoder in ``candidates`` that this PyAV/FFmpeg build provides."""
    import av

    for name in candidates:
        try:
            av.Codec(name, "w")
            return name
        except Exception:
            continue
    return None


def pad_even(frames: np.ndarray) -> np.ndarray:
    t, h, w, c = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def open_video_stream(path, fmt: str, encoders: Sequence[str], fps, width: int, height: int,
                      crf: int):
    """A PyAV container writing ``path`` and its yuv420p video stream, encoded the same way for
    every Matten video: the first available encoder of ``encoders``, quality ``crf``."""
    import av

    codec = available_encoder(encoders)
    if codec is None:
        raise RuntimeError(f"no encoder among {list(encoders)} is available in this FFmpeg build")
    rate = Fraction(fps).limit_denominator(1001)
    container = av.open(str(path), mode="w", format=fmt)
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    if codec in ("libx264", "h264"):
        stream.options = {"crf": str(int(crf)), "preset": "medium"}
    elif codec.startswith("libvpx"):
        stream.options = {"crf": str(int(crf) + 12), "b": "0"}
    else:  # mpeg4: constant bit rate generous enough for near-lossless small videos
        stream.bit_rate = max(2_000_000, int(width * height * float(rate) * 4))
    return container, stream


def encode_frames(container, stream, frames: np.ndarray) -> None:
    """Encode uint8 ``(T, H, W, 3)`` frames into ``stream`` and mux the packets."""
    import av

    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)


def flush_stream(container, stream) -> None:
    for packet in stream.encode():
        container.mux(packet)


def _write_av(tmp: Path, frames: np.ndarray, fps, fmt: str, encoders: Sequence[str],
              crf: int) -> None:
    frames = pad_even(frames)
    _, h, w, _ = frames.shape
    container, stream = open_video_stream(tmp, fmt, encoders, fps, w, h, crf)
    with container:
        encode_frames(container, stream, frames)
        flush_stream(container, stream)


def write_gif(tmp: Path, frames: np.ndarray, fps) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    duration = max(int(round(1000.0 / float(fps))), 10)
    # Note: the GIF encoder merges identical consecutive frames (their durations add up).
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                   duration=duration, loop=0, optimize=False, disposal=1)


def write_video(path, frames, fps: float = 8, crf: int = 18) -> Path:
    """Write ``uint8 (T, H, W, 3)`` frames to ``path``, atomically; the suffix picks the format.

    ``.mp4``/``.mov``/``.mkv``: H.264 (libx264) if available, else MPEG-4 part 2; ``.avi``: MPEG-4
    part 2; ``.webm``: VP9; all yuv420p, with odd heights/widths padded to even by repeating the
    last row/column. ``.gif``: Pillow, looping forever. Parent folders are created.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".gif" and suffix not in CONTAINERS:
        raise ValueError(f"cannot write video '{path}': unsupported suffix '{path.suffix}' "
                         f"(use one of {sorted(list(CONTAINERS) + ['.gif'])})")
    if not float(fps) > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    frames = as_uint8_frames(frames)
    with atomic_write_path(path) as tmp:
        if suffix == ".gif":
            write_gif(tmp, frames, fps)
        else:
            fmt, encoders = CONTAINERS[suffix]
            _write_av(tmp, frames, fps, fmt, encoders, crf)
    return path


def make_grid(videos, padding: int = 2, pad_value: int = 0, max_frames: int | None = None
              ) -> np.ndarray:
    """Tile videos into one ``uint8 (H', W', 3)`` image: one row per video, one column per frame.

    ``videos`` is ``uint8 (B, T, H, W, 3)`` or a list of ``(T, H, W, 3)`` arrays of the same
    frame size (shorter videos leave their last cells blank).
    """
    if hasattr(videos, "detach"):
        videos = videos.detach().cpu().numpy()
    if isinstance(videos, np.ndarray):
        if videos.ndim == 4:
            videos = videos[None]
        if videos.ndim != 5:
            raise ValueError(f"videos must have shape (B, T, H, W, 3), got {videos.shape}")
        videos = list(videos)
    videos = [as_uint8_frames(v, what=f"video {i}") for i, v in enumerate(videos)]
    if not videos:
        raise ValueError("no videos to put in the grid")
    h, w = videos[0].shape[1:3]
    for i, v in enumerate(videos):
        if v.shape[1:3] != (h, w):
            raise ValueError(f"video {i} has frame size {v.shape[1:3]}, video 0 has {(h, w)}")
    cols = max(v.shape[0] for v in videos)
    if max_frames is not None:
        cols = min(cols, int(max_frames))
    p = int(padding)
    grid = np.full((p + len(videos) * (h + p), p + cols * (w + p), 3), pad_value, dtype=np.uint8)
    for r, v in enumerate(videos):
        for c in range(min(cols, v.shape[0])):
            y, x = p + r * (h + p), p + c * (w + p)
            grid[y:y + h, x:x + w] = v[c]
    return grid


def save_grid_image(path, videos, padding: int = 2, pad_value: int = 0,
                    max_frames: int | None = None) -> Path:
    """Save videos as a PNG grid (rows = videos, columns = frames), atomically."""
    from PIL import Image

    path = Path(path)
    grid = make_grid(videos, padding=padding, pad_value=pad_value, max_frames=max_frames)
    fmt = "PNG" if path.suffix.lower() in ("", ".png") else None
    with atomic_write_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format=fmt or Image.registered_extensions().get(
            path.suffix.lower(), "PNG"))
    return path
