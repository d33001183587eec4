"""Videos of any length from a causal backbone, generated and written chunk by chunk.

A :class:`~matten.models.causal.CausalVideoBackbone` carries everything it needs from the past in
a fixed-size :class:`~matten.models.causal.CausalState`, so a video is generated one chunk at a
time: start the chunk from noise, denoise it with every step reading the history through the state
(``step(..., commit=False)``), then ``commit`` the clean chunk. Each finished chunk is handed to
the caller at once (decode it, append it to a :class:`StreamingVideoWriter`, drop it), so memory
stays constant however long the video is.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .data.video_io import (CONTAINERS, as_uint8_frames, encode_frames, flush_stream,
                            open_video_stream, pad_even, remove_stale_temp_files,
                            temp_file_beside, write_gif)
from .interrupts import interrupts_deferred

__all__ = ["LongVideoChunk", "iter_long", "generate_long", "StreamingVideoWriter",
           "write_long_video", "LongVideoInterrupted", "partial_video_path"]

Labels = Tensor | int | Callable[[int], "Tensor | int"] | None
Actions = Tensor | Callable[[int], Tensor] | None


@dataclass
class LongVideoChunk:
    """One finished chunk: ``frames`` (B, C, k, h, w) are video frames ``start .. start + k - 1``;
    ``state`` is the (conditional branch's) state after committing them."""
    start: int
    frames: Tensor
    state: object

    @property
    def stop(self) -> int:
        return self.start + self.frames.shape[2]


def _labels(y: Labels, frame: int, batch: int, device) -> Tensor | None:
    """Labels (B,) for the chunk starting at ``frame``: a callable picks them per chunk, so the
    class can change mid-stream (the model takes one label per sample for a whole chunk)."""
    if callable(y):
        y = y(frame)
    if y is None:
        return None
    y = torch.as_tensor(y, dtype=torch.long, device=device)
    if y.dim() == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"labels for frame {frame} must have shape ({batch},), "
                         f"got {tuple(y.shape)}")
    return y


def _actions(actions: Actions, start: int, stop: int, device) -> Tensor | None:
    """Actions of frames start .. stop - 1: a slice of a (B, F[, dim]) tensor, or a callable
    ``frame -> (B,) or (B, dim)`` stacked over the chunk (for actions decided while generating)."""
    if actions is None:
        return None
    if callable(actions):
        return torch.stack([torch.as_tensor(actions(f)) for f in range(start, stop)],
                           dim=1).to(device)
    return actions[:, start:stop].to(device)


def _check(num_frames: int, chunk_size: int, latent_shape, batch: int, sampler: str,
           eta: float, cfg_scale: float) -> None:
    if num_frames < 1 or chunk_size < 1 or batch < 1:
        raise ValueError(f"need num_frames, chunk_size and batch >= 1, got {num_frames}, "
                         f"{chunk_size}, {batch}")
    if len(tuple(latent_shape)) != 3:
        raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    if isinstance(eta, bool) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}")


@torch.no_grad()
def iter_long(model, diffusion, num_frames: int, chunk_size: int, latent_shape, *,
              batch: int = 1, y: Labels = None, actions: Actions = None, sampler: str = "ddim",
              eta: float = 0.0, cfg_scale: float = 1.0, clip_denoised: bool = False,
              generator: torch.Generator | None = None, device=None,
              progress: bool = False, context: torch.Tensor | None = None,
              teacher: torch.Tensor | None = None) -> Iterator[LongVideoChunk]:
    """Yield the chunks of a ``num_frames``-frame video in order (the last one may be shorter).

    ``context`` (B, C, n, h, w), optional: the first n frames, given (e.g. real frames whose
    continuation is wanted); they are committed clean and only frames n .. num_frames - 1 are
    generated and yielded. Labels and actions are indexed by absolute frame. ``teacher``
    (B, C, num_frames, h, w), optional: teacher forcing. Each chunk is still generated, but the
    real frames are committed in its place, so every chunk is made from the true past (to measure
    what a model does with a given history, without its own errors piling up).

    ``diffusion`` is a (respaced) diffusion; every frame of a chunk shares the noise level of the
    current step and the committed history is clean (t = 0). Random draws come from ``generator``
    in a fixed order: per chunk, its initial noise, then any sampler noise (DDPM, DDIM eta > 0).
    With ``cfg_scale`` != 1 (class-conditional models) the unconditional branch keeps its own
    state, its history committed under the null label, as it would be in a full-clip pass.
    """
    _check(num_frames, chunk_size, latent_shape, batch, sampler, eta, cfg_scale)
    if teacher is not None and (teacher.dim() != 5 or teacher.shape[0] != batch
                                or teacher.shape[2] < num_frames):
        raise ValueError(f"teacher must have shape (batch={batch}, C, >= {num_frames}, h, w), "
                         f"got {tuple(teacher.shape)}")
    if device is None:
        device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    guided = cfg_scale != 1.0
    null = getattr(model, "null_class", None)
    if guided and null is None:
        raise ValueError("classifier-free guidance needs a class-conditional model")
    state = model.init_state(batch)
    uncond_state = model.init_state(batch) if guided else None
    first = 0
    if context is not None:  # given frames 0 .. n-1: committed clean, then generation continues
        first = int(context.shape[2])
        if context.shape[0] != batch or first >= num_frames:
            raise ValueError(f"context must have shape (batch={batch}, C, n, h, w) with n < "
                             f"num_frames={num_frames}, got {tuple(context.shape)}")
        context = context.to(device, dtype)
        labels, acts = _labels(y, 0, batch, device), _actions(actions, 0, first, device)
        clean_t = torch.zeros(batch, first, device=device, dtype=torch.long)
        state = model.commit(context, clean_t, state, y=labels, actions=acts)
        if guided:
            uncond_state = model.commit(context, clean_t, uncond_state,
                                        y=torch.full_like(labels, null), actions=acts)
    sample_step = diffusion.ddim_sample if sampler == "ddim" else diffusion.p_sample
    extra = {"eta": float(eta)} if sampler == "ddim" else {}
    starts = range(first, num_frames, chunk_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="long video", unit="chunk")
    for start in starts:
        stop = min(start + chunk_size, num_frames)
        k = stop - start
        labels = _labels(y, start, batch, device)
        acts = _actions(actions, start, stop, device)
        if guided and labels is None:
            raise ValueError("classifier-free guidance needs labels y")
        null_labels = torch.full_like(labels, null) if guided else None

        def chunk_model(x, t, _labels=labels, _acts=acts, _null=null_labels):
            # t arrives as original (un-respaced) timesteps (B,); one level for the whole chunk.
            t = t[:, None].expand(-1, x.shape[2]) if t.dim() == 1 else t
            out = model.step(x, t, state, y=_labels, actions=_acts, commit=False)[0]
            if not guided:
                return out
            uncond = model.step(x, t, uncond_state, y=_null, actions=_acts, commit=False)[0]
            c = x.shape[1]
            eps = torch.lerp(uncond[:, :c], out[:, :c], float(cfg_scale))
            return torch.cat([eps, out[:, c:]], dim=1)

        shape = (batch, int(latent_shape[0]), k, *(int(n) for n in latent_shape[1:]))
        # Drawn on the generator's device so a CPU generator gives the same video anywhere.
        x = torch.randn(shape, generator=generator, dtype=dtype,
                        device=generator.device if generator is not None else device).to(device)
        for i in range(diffusion.num_timesteps - 1, -1, -1):
            t = torch.full((batch,), i, device=device, dtype=torch.long)
            x = sample_step(chunk_model, x, t, clip_denoised, None, generator=generator,
                            **extra)["sample"]
        clean_t = torch.zeros(batch, k, device=device, dtype=torch.long)
        past = x if teacher is None else teacher[:, :, start:stop].to(device, dtype)
        state = model.commit(past, clean_t, state, y=labels, actions=acts)
        if guided:
            uncond_state = model.commit(past, clean_t, uncond_state, y=null_labels, actions=acts)
        yield LongVideoChunk(start, x, state)


def generate_long(model, diffusion, num_frames: int, chunk_size: int, latent_shape, *,
                  on_chunk: Callable[[LongVideoChunk], None] | None = None, **kwargs):
    """Generate a long video autoregressively; keyword arguments as for :func:`iter_long`.

    With ``on_chunk`` each finished chunk is passed to it and dropped, so memory does not grow
    with the video; the number of frames is returned. Without it the whole latent video
    (B, C, num_frames, h, w) is returned, which is only sensible for short videos.
    """
    chunks = iter_long(model, diffusion, num_frames, chunk_size, latent_shape, **kwargs)
    if on_chunk is None:
        return torch.cat([c.frames for c in chunks], dim=2)
    total = 0
    for chunk in chunks:
        on_chunk(chunk)
        total = chunk.stop
    return total


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
    removed on open. Encoding matches :func:`matten.data.write_video` (H.264 or MPEG-4 for
    .mp4/.mov/.mkv/.avi, VP9 for .webm, yuv420p, odd sizes padded to even). ``.gif`` is supported
    by buffering every frame in memory until close, so use it for short videos only.
    """

    def __init__(self, path, fps: float = 8, crf: int = 18, keep_partial: bool = False):
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix != ".gif" and self.suffix not in CONTAINERS:
            raise ValueError(f"cannot write video '{self.path}': unsupported suffix "
                             f"'{self.path.suffix}' (use one of "
                             f"{sorted(list(CONTAINERS) + ['.gif'])})")
        if not float(fps) > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps, self.crf, self.keep_partial = fps, int(crf), keep_partial
        self.frames_written = 0
        self.partial_path: Path | None = None  # set when an abort kept the frames written
        self._tmp: Path | None = None
        self._container = self._stream = None
        self._size: tuple[int, int] | None = None
        self._gif: list[np.ndarray] = []

    # ------------------------------------------------------------------ context

    def __enter__(self) -> "StreamingVideoWriter":
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
            self._container, self._stream = open_video_stream(self._tmp, fmt, encoders, self.fps,
                                                              w, h, self.crf)
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
            mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0o644
            os.chmod(tmp, mode)
            os.replace(tmp, self.path)
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
                os.chmod(tmp, 0o644)  # like every other output, not mkstemp's 0600
                os.replace(tmp, target)
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


class LongVideoInterrupted(KeyboardInterrupt):
    """:func:`write_long_video` with ``keep_partial`` stopped by Ctrl-C (or SIGTERM within
    :func:`matten.interrupts.sigterm_as_interrupt`): ``partial`` is the playable video of the
    ``frames`` frames finished so far (None when no frame was), ``interrupt`` the original
    ``KeyboardInterrupt``."""

    def __init__(self, partial: Path | None, frames: int, interrupt: KeyboardInterrupt):
        super().__init__(f"interrupted after {frames} frames")
        self.partial, self.frames, self.interrupt = partial, frames, interrupt


def write_long_video(model, diffusion, autoencoder, path, num_frames: int, chunk_size: int,
                     latent_shape, *, fps: float = 8, keep_partial: bool = False,
                     min_size: int = 0, **kwargs) -> Path:
    """Generate a long video and write it while generating: each chunk is decoded by
    ``autoencoder`` and appended to ``path`` (a batch is tiled side by side), so neither latents
    nor pixels accumulate. Frames smaller than ``min_size`` pixels are enlarged (nearest
    neighbour) so they can be seen. Keyword arguments as for :func:`iter_long`.

    With ``keep_partial`` an interrupted generation keeps the frames finished so far in
    :func:`partial_video_path` (``path`` itself is not touched) and raises
    :class:`LongVideoInterrupted`, which says where they are.
    """
    from .data import video_to_uint8
    from .sampling import upscale_frames, tile_videos

    writer = StreamingVideoWriter(path, fps=fps, keep_partial=keep_partial)
    try:
        with writer:
            for chunk in iter_long(model, diffusion, num_frames, chunk_size, latent_shape,
                                   **kwargs):
                with torch.no_grad():
                    pixels = autoencoder.decode(chunk.frames).clamp(-1, 1)
                frames = upscale_frames(video_to_uint8(pixels), min_size)  # (B, k, H, W, 3)
                writer.write(frames[0] if len(frames) == 1 else tile_videos(frames))
    except KeyboardInterrupt as stop:
        if not keep_partial:
            raise
        raise LongVideoInterrupted(writer.partial_path, writer.frames_written, stop) from stop
    return Path(path)
