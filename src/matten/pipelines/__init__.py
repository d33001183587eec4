"""Sampling, in one place: clip and long-video pipelines (``from_pretrained`` + ``__call__``),
the sampling loops they run, a live streaming
session, and the checks every sampler call goes through."""

from .clip import MattenPipeline, sample_latents, sample_videos
from .long import (
    LongVideoChunk,
    LongVideoInterrupted,
    LongVideoPipeline,
    commit_frames,
    generate_long,
    iter_long,
    sample_chunk,
    write_long_video,
)
from .session import StateMismatchError, StreamingSession
from .settings import (
    SAMPLERS,
    SamplingError,
    check_sampling,
    default_steps,
    resolve_labels,
    run_sampler,
    sampling_diffusion,
)

__all__ = [
    "MattenPipeline",
    "LongVideoPipeline",
    "LongVideoChunk",
    "LongVideoInterrupted",
    "SAMPLERS",
    "SamplingError",
    "StateMismatchError",
    "StreamingSession",
    "check_sampling",
    "commit_frames",
    "default_steps",
    "generate_long",
    "iter_long",
    "resolve_labels",
    "run_sampler",
    "sample_chunk",
    "sample_latents",
    "sample_videos",
    "sampling_diffusion",
    "write_long_video",
]
