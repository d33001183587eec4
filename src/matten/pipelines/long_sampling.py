"""Long videos chunk by chunk: the sampling loop of a causal backbone.

A causal backbone (``Matten-Causal``) carries everything it needs from the past in a fixed-size
state, so a video is generated one chunk at a time: start the chunk from noise, denoise it with
:class:`~matten.diffusion.GaussianDiffusion`'s own DDPM or DDIM loop, every step reading the
history through the state (``step(..., commit=False)``), then ``commit`` the clean chunk. Each
finished chunk is handed to the caller at once, so memory stays constant however long the video
is. Classifier-free guidance is :func:`~matten.diffusion.classifier_free_guidance` on a state of
twice the batch: its second half is the unconditional branch, whose history is committed under
the null label, as it would be in a full-clip pass. Writing and the pipeline: :mod:`.long`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..diffusion import action_guidance, classifier_free_guidance
from .settings import check_sampling, run_sampler

if TYPE_CHECKING:
    pass


__all__ = ["LongVideoChunk", "iter_long", "sample_chunk", "commit_frames", "generate_long"]

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
    action_cfg_scale: float = 1.0,
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
    current step and the committed history is clean (t = 0). ``action_cfg_scale`` != 1 guides
    each chunk on its actions (a model trained with action dropout; :func:`sample_chunk`).
    Random draws come from ``generator``
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
            action_cfg_scale=action_cfg_scale,
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
    action_cfg_scale: float = 1.0,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    device=None,
    committed: Tensor | None = None,
) -> tuple[Tensor, Any]:
    """The ``k`` frames after those in ``state``: denoised from noise (drawn from ``generator``)
    with the sampler's own loop, then committed -> (frames (B, C, k, h, w), the advanced state).

    ``labels`` (B,) and ``actions`` (B, k[, dim]) are the chunk's; with guidance
    (``cfg_scale`` != 1) ``state`` is of twice the batch. ``action_cfg_scale`` != 1: guidance
    on the chunk's actions, against the null action (the history keeps its own, so the state
    is not doubled for it; each denoising step runs the model twice). ``committed``: frames to
    commit in place of the generated ones (teacher forcing)."""
    guided = cfg_scale != 1.0
    if guided and labels is None:
        raise ValueError("classifier-free guidance needs labels y")
    action_guided = action_cfg_scale != 1.0
    if action_guided and (actions is None or getattr(model, "null_action", None) is None):
        raise ValueError(
            "guidance on actions needs actions and a model trained with action dropout "
            "(model.causal.action_dropout_prob > 0)"
        )
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
    if action_guided:
        net = action_guidance(net, float(action_cfg_scale), int(model.null_action))
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
