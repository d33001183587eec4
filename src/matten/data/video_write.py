"""Writing videos, atomically: whole videos (:func:`write_video`) are one call of the writer
that appends frames as they come (:class:`StreamingVideoWriter`), which writes a hidden temporary
file and renames it into place when complete (:mod:`.atomic`). H.264 (or MPEG-4) in
.mp4/.mov/.mkv, MPEG-4 in .avi, VP9 in .webm, all yuv420p; GIFs through Pillow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..interrupts import interrupts_deferred
from .atomic import commit_temp, remove_stale_temp_files, temp_file_beside
from .video_read import CONTAINERS

# The suffixes a video can be written with (the output of `matten sample` and the previews).
VIDEO_SUFFIXES = (".gif", ".mp4", ".webm", ".mov", ".mkv", ".avi")


def as_uint8_frames(frames, what: str = "frames") -> np.ndarray:
    """Validate/convert to a contiguous ``uint8 (T, H, W, 3)`` array (gray is repeated to RGB)."""
    if hasattr(frames, "detach"):  # torch tensor
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f) for f in frames]) if len(frames) else np.zeros((0,))
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(
            f"{what} must be uint8 in [0, 255], got dtype {frames.dtype} "
            "(convert float videos in [-1, 1] with matten.data.video_to_uint8)"
        )
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or 0 in frames.shape:
        raise ValueError(
            f"{what} must have shape (T, H, W, 3) with T, H, W > 0, got {tuple(frames.shape)}"
        )
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


def open_video_stream(
    path, fmt: str, encoders: Sequence[str], fps, width: int, height: int, crf: int
):
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


def write_gif(tmp: Path, frames: np.ndarray, fps) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    duration = max(int(round(1000.0 / float(fps))), 10)
    # Note: the GIF encoder merges identical consecutive frames (their durations add up).
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=duration,
        loop=0,
        optimize=False,
        disposal=1,
    )


def check_video_path(path, fps) -> str:
    """The lower-case suffix of a video ``path`` this module can write; a clear error for an
    unsupported suffix or a frame rate that is not positive."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".gif" and suffix not in CONTAINERS:
        raise ValueError(
            f"cannot write video '{path}': unsupported suffix '{path.suffix}' "
            f"(use one of {sorted(list(CONTAINERS) + ['.gif'])})"
        )
    if not float(fps) > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return suffix


def write_video(path, frames, fps: float = 8, crf: int = 18) -> Path:
    """Write ``uint8 (T, H, W, 3)`` frames to ``path``, atomically; the suffix picks the format.

    ``.mp4``/``.mov``/``.mkv``: H.264 (libx264) if available, else MPEG-4 part 2; ``.avi``: MPEG-4
    part 2; ``.webm``: VP9; all yuv420p, with odd heights/widths padded to even by repeating the
    last row/column. ``.gif``: Pillow, looping forever. Parent folders are created. The whole
    video is one :class:`StreamingVideoWriter` call.
    """
    with StreamingVideoWriter(path, fps=fps, crf=crf) as writer:
        writer.write(frames)
    return Path(path)


def partial_video_path(path) -> Path:
    """Where the unfinished part of ``path`` is kept: ``out.mp4`` -> ``out.partial.mp4`` (the
    suffix stays last so players open it), or ``out.partial-2.mp4``, ``-3``, ... when that name
    is taken: a partial video never replaces an existing file."""
    path = Path(path)
    candidate = path.with_name(f"{path.stem}.partial{path.suffix}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}.partial-{n}{path.suffix}")
    return candidate


class StreamingVideoWriter:
    """Append frames to a video file as they are produced, atomically.

    Frames go to a hidden temporary file next to ``path``, renamed into place on a clean close,
    so ``path`` never holds a half-written video. On an exception (Ctrl-C included) inside the
    ``with`` block the temporary file is deleted, unless ``keep_partial`` is set: then the frames
    written so far are finished into a playable :func:`partial_video_path` (``out.partial.mp4``),
    named in :attr:`partial_path`. Temporary files that killed writers of ``path`` left are
    removed on open. Encoding as for :func:`write_video` (H.264 or MPEG-4 for
    .mp4/.mov/.mkv/.avi, VP9 for .webm, yuv420p, odd sizes padded to even). ``.gif`` is supported
    by buffering every frame in memory until close, so use it for short videos only.
    """

    def __init__(self, path, fps: float = 8, crf: int = 18, keep_partial: bool = False):
        self.path = Path(path)
        self.suffix = check_video_path(self.path, fps)
        self.fps, self.crf, self.keep_partial = fps, int(crf), keep_partial
        self.frames_written = 0
        self.partial_path: Path | None = None  # set when an abort kept the frames written
        self._tmp: Path | None = None
        self._container = self._stream = None
        self._size: tuple[int, int] | None = None
        self._gif: list[np.ndarray] = []

    # ------------------------------------------------------------------ context

    def __enter__(self) -> StreamingVideoWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def open(self) -> None:
        if self._tmp is not None:
            raise RuntimeError(f"'{self.path}' is already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.path)
        self._tmp = temp_file_beside(self.path)

    # ------------------------------------------------------------------ writing

    def write(self, frames) -> None:
        """Append ``uint8 (k, H, W, 3)`` frames; every frame must have the size of the first."""
        if self._tmp is None:
            raise RuntimeError("the writer is not open (use it as a context manager)")
        frames = as_uint8_frames(frames)
        size = tuple(frames.shape[1:3])
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise ValueError(f"frames of size {size} differ from the first frames' {self._size}")
        # A Ctrl-C between encoding a frame and muxing its packets would leave a hole in the
        # video that a partial file could not be played past: it lands once they are counted.
        with interrupts_deferred():
            if self.suffix == ".gif":
                self._gif.extend(frames)
            else:
                self._encode(pad_even(frames))
            self.frames_written += len(frames)

    def _encode(self, frames: np.ndarray) -> None:
        if self._container is None:
            fmt, encoders = CONTAINERS[self.suffix]
            _, h, w, _ = frames.shape
            self._container, self._stream = open_video_stream(
                self._tmp, fmt, encoders, self.fps, w, h, self.crf
            )
        encode_frames(self._container, self._stream, frames)

    def _finish(self) -> None:
        """Flush the encoder and close the temporary file."""
        if self.suffix == ".gif":
            if self._gif:
                write_gif(self._tmp, np.stack(self._gif), self.fps)
                self._gif = []
            return
        if self._container is not None:
            try:
                flush_stream(self._container, self._stream)
            finally:
                self._container.close()
                self._container = self._stream = None

    # ------------------------------------------------------------------ closing

    def close(self) -> Path:
        """Finish the file and move it into place; a video needs at least one frame."""
        if self._tmp is None:
            return self.path
        tmp = self._tmp
        try:
            if self.frames_written == 0:
                raise ValueError(f"no frames were written to '{self.path}'")
            self._finish()
            commit_temp(tmp, self.path)
        except BaseException:
            self._discard(tmp)
            raise
        finally:
            self._tmp = None
        return self.path

    def abort(self) -> None:
        """Drop the temporary file, or with ``keep_partial`` finish the frames written so far
        into :func:`partial_video_path` (then named in :attr:`partial_path`)."""
        if self._tmp is None:
            return
        tmp, self._tmp = self._tmp, None
        if self.keep_partial and self.frames_written:
            try:
                self._finish()
                target = partial_video_path(self.path)
                commit_temp(tmp, target)
                self.partial_path = target
                return
            except Exception:
                pass  # the error that stopped the writing matters more than the partial file
            except BaseException:  # a second Ctrl-C while finishing: stop at once
                self._discard(tmp)
                raise
        self._discard(tmp)

    def _discard(self, tmp: Path) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = self._stream = None
        self._gif = []
        with contextlib.suppress(OSError):
            tmp.unlink()
