"""Videos of any length from a causal backbone, generated and written chunk by chunk.

A causal backbone (``Matten-Causal``) carries everything it needs from the past in a fixed-size
state, so a video is generated one chunk at a time: start the chunk from noise, denoise it with
:class:`~matten.diffusion.GaussianDiffusion`'s own DDPM or DDIM loop, every step reading the
history through the state (``step(..., commit=False)``), then ``commit`` the clean chunk. Each
finished chunk is handed to the caller at once (decode it, append it to a
:class:`~matten.data.StreamingVideoWriter`, drop it), so memory stays constant however long the
video is. Classifier-free guidance is :func:`~matten.diffusion.classifier_free_guidance` on a
state of twice the batch: its second half is the unconditional branch, whose history is
committed under the null label, as it would be in a full-clip pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data import StreamingVideoWriter, tile_videos, upscale_frames, video_to_uint8
from ..diffusion import classifier_free_guidance
from ..latent import PixelAutoencoder
from .clip import MattenPipeline
from .settings import SamplingError, check_sampling, run_sampler, sampling_diffusion

if TYPE_CHECKING:
    from ..models.causal import CausalVideoBackbone

__all__ = [
    "LongVideoChunk",
    "iter_long",
    "sample_chunk",
    "commit_frames",
    "generate_long",
    "write_long_video",
    "LongVideoInterrupted",
    "LongVideoPipeline",
]

Labels = Tensor | int | Callable[[int], "Tensor | int"] | None
Actions = Tensor | Callable[[int], Tensor] | None


@dataclass
class LongVideoChunk:
    """One finished chunk: ``frames`` (B, C, k, h, w) are video frames ``start .. start + k - 1``;
    ``state`` is the state after committing them (with guidance: of twice the batch, the
    conditional branch first)."""

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
        raise ValueError(
            f"labels for frame {frame} must have shape ({batch},), got {tuple(y.shape)}"
        )
    return y


def _actions(actions: Actions, start: int, stop: int, device) -> Tensor | None:
    """Actions of frames start .. stop - 1: a slice of a (B, F[, dim]) tensor, or a callable
    ``frame -> (B,) or (B, dim)`` stacked over the chunk (for actions decided while generating)."""
    if actions is None:
        return None
    if callable(actions):
        return torch.stack([torch.as_tensor(actions(f)) for f in range(start, stop)], dim=1).to(
            device
        )
    return actions[:, start:stop].to(device)


def _check(num_frames: int, chunk_size: int, latent_shape, batch: int) -> None:
    if num_frames < 1 or chunk_size < 1 or batch < 1:
        raise ValueError(
            f"need num_frames, chunk_size and batch >= 1, got {num_frames}, {chunk_size}, {batch}"
        )
    if len(tuple(latent_shape)) != 3:
        raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")


@torch.no_grad()
def iter_long(
    model,
    diffusion,
    num_frames: int,
    chunk_size: int,
    latent_shape,
    *,
    batch: int = 1,
    y: Labels = None,
    actions: Actions = None,
    sampler: str = "ddim",
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    device=None,
    progress: bool = False,
    context: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
) -> Iterator[LongVideoChunk]:
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
    """
    _check(num_frames, chunk_size, latent_shape, batch)
    guided = cfg_scale != 1.0
    check_sampling(
        sampler,
        diffusion.num_timesteps,
        eta,
        cfg_scale,
        diffusion.num_timesteps,
        conditional=guided and y is not None,
    )
    if teacher is not None and (
        teacher.dim() != 5 or teacher.shape[0] != batch or teacher.shape[2] < num_frames
    ):
        raise ValueError(
            f"teacher must have shape (batch={batch}, C, >= {num_frames}, h, w), "
            f"got {tuple(teacher.shape)}"
        )
    if device is None:
        device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if guided and getattr(model, "null_class", None) is None:
        raise ValueError("classifier-free guidance needs a class-conditional model")
    copies = 2 if guided else 1  # the unconditional branch: the second half of the state

    state = model.init_state(batch * copies)
    first = 0
    if context is not None:  # given frames 0 .. n-1: committed clean, then generation continues
        first = int(context.shape[2])
        if context.shape[0] != batch or first >= num_frames:
            raise ValueError(
                f"context must have shape (batch={batch}, C, n, h, w) with n < "
                f"num_frames={num_frames}, got {tuple(context.shape)}"
            )
        state = commit_frames(
            model,
            context.to(device, dtype),
            state,
            _labels(y, 0, batch, device),
            _actions(actions, 0, first, device),
            guided,
        )
    starts = range(first, num_frames, chunk_size)
    if progress:
        starts = tqdm(starts, desc="long video", unit="chunk")
    for start in starts:
        stop = min(start + chunk_size, num_frames)
        labels = _labels(y, start, batch, device)
        acts = _actions(actions, start, stop, device)
        past = None if teacher is None else teacher[:, :, start:stop].to(device, dtype)
        x, state = sample_chunk(
            model,
            diffusion,
            state,
            stop - start,
            latent_shape,
            labels=labels,
            actions=acts,
            sampler=sampler,
            eta=eta,
            cfg_scale=cfg_scale,
            clip_denoised=clip_denoised,
            generator=generator,
            device=device,
            committed=past,
        )
        yield LongVideoChunk(start, x, state)


def commit_frames(
    model, frames: Tensor, state, labels: Tensor | None, actions: Tensor | None, guided: bool
):
    """Write clean ``frames`` (B, C, k, h, w) into ``state``; with guidance (a state of twice
    the batch) the second half gets them too, under the null label."""
    clean_t = torch.zeros(state.batch, frames.shape[2], device=frames.device, dtype=torch.long)
    if guided:
        if labels is None:
            raise ValueError("classifier-free guidance needs labels y")
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
        actions = None if actions is None else torch.cat([actions, actions])
        frames = frames.repeat(2, 1, 1, 1, 1)
    return model.commit(frames, clean_t, state, y=labels, actions=actions)


@torch.no_grad()
def sample_chunk(
    model,
    diffusion,
    state,
    k: int,
    latent_shape,
    *,
    labels: Tensor | None = None,
    actions: Tensor | None = None,
    sampler: str = "ddim",
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    device=None,
    committed: Tensor | None = None,
) -> tuple[Tensor, Any]:
    """The ``k`` frames after those in ``state``: denoised from noise (drawn from ``generator``)
    with the sampler's own loop, then committed -> (frames (B, C, k, h, w), the advanced state).

    ``labels`` (B,) and ``actions`` (B, k[, dim]) are the chunk's; with guidance
    (``cfg_scale`` != 1) ``state`` is of twice the batch. ``committed``: frames to commit in
    place of the generated ones (teacher forcing)."""
    guided = cfg_scale != 1.0
    if guided and labels is None:
        raise ValueError("classifier-free guidance needs labels y")
    if device is None:
        device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = state.batch // (2 if guided else 1)

    def chunk_model(x, t, y=None, actions=None):
        # t arrives as original (un-respaced) timesteps (B,); one level for the whole chunk.
        t = t[:, None].expand(-1, x.shape[2]) if t.dim() == 1 else t
        return model.step(x, t, state, y=y, actions=actions, commit=False)[0]

    net = (
        classifier_free_guidance(chunk_model, float(cfg_scale), int(model.null_class))
        if guided
        else chunk_model
    )
    shape = (batch, int(latent_shape[0]), k, *(int(n) for n in latent_shape[1:]))
    # Drawn on the generator's device so a CPU generator gives the same video anywhere.
    noise = torch.randn(
        shape,
        generator=generator,
        dtype=dtype,
        device=generator.device if generator is not None else device,
    )
    x = run_sampler(
        diffusion,
        net,
        noise.to(device),
        sampler=sampler,
        eta=eta,
        model_kwargs={"y": labels, "actions": actions},
        generator=generator,
        clip_denoised=clip_denoised,
    )
    past = x if committed is None else committed
    return x, commit_frames(model, past, state, labels, actions, guided)


def generate_long(
    model,
    diffusion,
    num_frames: int,
    chunk_size: int,
    latent_shape,
    *,
    on_chunk: Callable[[LongVideoChunk], None] | None = None,
    **kwargs,
):
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


class LongVideoInterrupted(KeyboardInterrupt):
    """:func:`write_long_video` with ``keep_partial`` stopped by Ctrl-C (or SIGTERM within
    :func:`matten.interrupts.sigterm_as_interrupt`): ``partial`` is the playable video of the
    ``frames`` frames finished so far (None when no frame was), ``interrupt`` the original
    ``KeyboardInterrupt``."""

    def __init__(self, partial: Path | None, frames: int, interrupt: KeyboardInterrupt):
        super().__init__(f"interrupted after {frames} frames")
        self.partial, self.frames, self.interrupt = partial, frames, interrupt


def write_long_video(
    model,
    diffusion,
    autoencoder,
    path,
    num_frames: int,
    chunk_size: int,
    latent_shape,
    *,
    fps: float = 8,
    keep_partial: bool = False,
    min_size: int = 0,
    **kwargs,
) -> Path:
    """Generate a long video and write it while generating: each chunk is decoded by
    ``autoencoder`` and appended to ``path`` (a batch is tiled side by side), so neither latents
    nor pixels accumulate. Frames smaller than ``min_size`` pixels are enlarged (nearest
    neighbour) so they can be seen. Keyword arguments as for :func:`iter_long`.

    With ``keep_partial`` an interrupted generation keeps the frames finished so far in
    :func:`partial_video_path` (``path`` itself is not touched) and raises
    :class:`LongVideoInterrupted`, which says where they are.
    """
    writer = StreamingVideoWriter(path, fps=fps, keep_partial=keep_partial)
    try:
        with writer:
            for chunk in iter_long(
                model, diffusion, num_frames, chunk_size, latent_shape, **kwargs
            ):
                with torch.no_grad():
                    pixels = autoencoder.decode(chunk.frames).clamp(-1, 1)
                frames = upscale_frames(video_to_uint8(pixels), min_size)  # (B, k, H, W, 3)
                writer.write(frames[0] if len(frames) == 1 else tile_videos(frames))
    except KeyboardInterrupt as stop:
        if not keep_partial:
            raise
        raise LongVideoInterrupted(writer.partial_path, writer.frames_written, stop) from stop
    return Path(path)


class LongVideoPipeline(MattenPipeline):
    """A long-video (causal, streaming) model as a pipeline: :meth:`stream` yields decoded
    chunks as they are made, ``__call__`` returns a whole video, :meth:`write` writes one to a
    file while generating. Settings left as None take the run's ``sample`` section."""

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> LongVideoPipeline:
        pipe = super().from_pretrained(path, **kwargs)
        if not pipe.model.streams:
            raise SamplingError(
                f"'{pipe.loaded.folder}' holds a clip model, which generates its "
                f"{pipe.loaded.num_frames} training frames: long videos need a "
                "long-video model (model.name: Matten-Causal)"
            )
        return pipe

    @property
    def model(self) -> CausalVideoBackbone:
        # from_pretrained refuses a model that does not stream: these are CausalVideoBackbones.
        return cast("CausalVideoBackbone", self.loaded.model)

    def generation_settings(
        self,
        *,
        num_videos: int = 1,
        class_labels=None,
        sampler=None,
        steps=None,
        eta=None,
        cfg_scale=None,
        seed=None,
        actions=None,
    ) -> dict:
        """The keyword arguments of :func:`iter_long` for these settings (None: the run's)."""
        loaded = self.loaded
        labels = class_labels
        if not callable(class_labels):
            labels = self.labels(class_labels, num_videos)
        sampler = self.default("sampler", sampler, "ddim")
        steps = check_sampling(
            sampler,
            self.default("steps", steps, None),
            0.0,
            1.0,
            loaded.diffusion_steps,
            conditional=False,
        )
        cfg_scale = self.guidance_scale(cfg_scale, labels)
        if actions is None and self.model.takes_actions:
            clips = loaded.training_actions(num_videos)  # the training clips' moves, cycled
            if clips is not None:  # else the model refuses to run without actions
                actions = lambda frame: clips[:, frame % clips.shape[1]]  # noqa: E731
        seed = int(self.default("seed", seed, 0))
        return dict(
            diffusion=sampling_diffusion(
                steps,
                diffusion_steps=loaded.diffusion_steps,
                learn_sigma=loaded.learn_sigma,
                prediction=loaded.prediction,
            ),
            batch=num_videos,
            y=labels,
            actions=actions,
            sampler=sampler,
            eta=float(self.default("eta", eta, 0.0)),
            cfg_scale=cfg_scale,
            clip_denoised=isinstance(self.autoencoder, PixelAutoencoder),
            generator=torch.Generator().manual_seed(seed),
            device=self.device,
        )

    def latent_shape(self) -> tuple[int, int, int]:
        h, w = self.loaded.latent_size
        return self.autoencoder.latent_channels, h, w

    def stream(
        self,
        num_frames: int,
        chunk_size: int = 2,
        *,
        progress: bool = False,
        context=None,
        **settings,
    ) -> Iterator[LongVideoChunk]:
        """Chunks of a ``num_frames``-frame video as they are generated, ``frames`` decoded to
        pixels (B, 3, k, H, W) in [-1, 1]. Settings as for :meth:`generation_settings`."""
        kwargs = self.generation_settings(**settings)
        diffusion = kwargs.pop("diffusion")
        for chunk in iter_long(
            self.model,
            diffusion,
            num_frames,
            chunk_size,
            self.latent_shape(),
            progress=progress,
            context=context,
            **kwargs,
        ):
            with torch.no_grad():
                pixels = self.autoencoder.decode(chunk.frames).clamp(-1, 1)
            yield LongVideoChunk(chunk.start, pixels, chunk.state)

    # A video of num_frames frames rather than num_samples clips: other arguments than the base's.
    def __call__(  # type: ignore[override]
        self,
        num_frames: int,
        chunk_size: int = 2,
        **kwargs,
    ) -> Tensor:
        """A whole video (B, 3, num_frames, H, W) in [-1, 1]; for long ones prefer
        :meth:`stream` or :meth:`write`, whose memory does not grow with the video."""
        return torch.cat([c.frames for c in self.stream(num_frames, chunk_size, **kwargs)], dim=2)

    def write(
        self,
        path,
        num_frames: int,
        chunk_size: int = 2,
        *,
        fps: float | None = None,
        keep_partial: bool = False,
        min_size: int = 128,
        progress: bool = False,
        **settings,
    ) -> Path:
        """Generate and write a video as it comes (see :func:`write_long_video`)."""
        kwargs = self.generation_settings(**settings)
        return write_long_video(
            self.model,
            kwargs.pop("diffusion"),
            self.autoencoder,
            path,
            num_frames,
            chunk_size,
            self.latent_shape(),
            fps=float(self.default("fps", fps, 8)),
            keep_partial=keep_partial,
            min_size=min_size,
            progress=progress,
            **kwargs,
        )
