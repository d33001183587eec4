"""Videos of any length from a causal backbone: written as they are generated, and the pipeline.

The chunk-by-chunk sampling loop is :mod:`.long_sampling` (``iter_long``, re-exported here);
this module writes its chunks into a video file as they come (:func:`write_long_video`, memory
constant however long the video) and wraps both in :class:`LongVideoPipeline`
(``from_pretrained`` + ``stream`` / ``__call__`` / ``write``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from ..data import StreamingVideoWriter, tile_videos, upscale_frames, video_to_uint8
from ..diffusion import check_cfg_scale
from ..latent import PixelAutoencoder
from .clip import MattenPipeline
from .settings import SamplingError, check_sampling, sampling_diffusion

if TYPE_CHECKING:
    from ..models.causal import CausalVideoBackbone

from .long_sampling import LongVideoChunk, commit_frames, generate_long, iter_long, sample_chunk

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
        action_cfg_scale=None,
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
            diffusion=self.respaced_diffusion(steps),
            batch=num_videos,
            y=labels,
            actions=actions,
            sampler=sampler,
            eta=float(self.default("eta", eta, 0.0)),
            cfg_scale=cfg_scale,
            action_cfg_scale=self.action_guidance_scale(action_cfg_scale),
            clip_denoised=isinstance(self.autoencoder, PixelAutoencoder),
            generator=torch.Generator().manual_seed(seed),
            device=self.device,
        )

    def respaced_diffusion(self, steps: int):
        """The checkpoint's diffusion (its steps, schedule, prediction, variance) respaced to
        ``steps`` sampling steps."""
        loaded = self.loaded
        return sampling_diffusion(
            steps,
            diffusion_steps=loaded.diffusion_steps,
            learn_sigma=loaded.learn_sigma,
            prediction=loaded.prediction,
            schedule=loaded.schedule,
        )

    def action_guidance_scale(self, asked=None) -> float:
        """The guidance scale on actions: ``asked``, else the run's ``sample.action_cfg_scale``,
        else 1 (none). A model trained without the null action has none: a scale asked of it
        is refused, a stored default ignored."""
        if self.model.null_action is None:
            if asked is not None and asked != 1:
                raise SamplingError(
                    "guidance on actions needs a model trained with action dropout "
                    "(model.causal.action_dropout_prob > 0); this one has no null action"
                )
            return 1.0
        scale = self.default("action_cfg_scale", asked, 1.0)
        try:
            check_cfg_scale(scale)
        except ValueError:
            raise SamplingError(
                f"the guidance scale on actions (--action-cfg-scale, sample.action_cfg_scale) "
                f"must be a finite number >= 0, got {scale!r}"
            ) from None
        return float(scale)

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
