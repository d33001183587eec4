"""Noise levels for diffusion forcing: one per frame, so a causal model learns to denoise the next
frames whatever state its history is in.

Independent levels alone rarely show the model what autoregressive generation gives it: a long
run of *clean* frames (committed at t = 0) followed by the frames being denoised. Frames far back
are then clean only by chance, so a long-range memory is trained mostly on noise and is out of
distribution when it is finally written with clean frames. ``history_prob`` mixes in that case:
a clip's first frames, a random number of them, are given clean and left out of the loss.

Generation feeds the model its *own* frames as history, and they carry its errors; a model that
only ever saw exactly clean history compounds them over a long rollout. ``context_noise`` gives
the history frames a small random noise level instead of 0 (uniform in 1 .. context_noise * T),
so the model learns to read a slightly corrupted context. Sampling still commits clean frames.
"""

from __future__ import annotations

import torch


def forcing_timesteps(
    batch: int,
    frames: int,
    num_timesteps: int,
    history_prob: float = 0.0,
    device=None,
    context_noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-frame timesteps t (B, F) and per-frame loss weights (B, F), or None when every frame
    counts.

    Every frame draws its own level uniformly from [0, num_timesteps). With probability
    ``history_prob`` a clip instead keeps its first n frames clean (t = 0, weight 0), n uniform in
    1 .. F - 1, and the rest keep their independent levels. ``context_noise`` > 0 gives those
    history frames a level uniform in 1 .. max(1, int(context_noise * num_timesteps)) instead of
    0 (still weight 0); at 0 the draws are exactly those made without the option.
    """
    if not 0.0 <= history_prob <= 1.0:
        raise ValueError(f"history_prob must be in [0, 1], got {history_prob}")
    if not 0.0 <= context_noise < 1.0:
        raise ValueError(f"context_noise must be in [0, 1), got {context_noise}")
    t = torch.randint(0, num_timesteps, (batch, frames), device=device)
    if history_prob == 0.0 or frames < 2:
        return t, None
    with_history = torch.rand(batch, device=device) < history_prob
    length = torch.randint(1, frames, (batch,), device=device) * with_history
    history = torch.arange(frames, device=device)[None] < length[:, None]  # (B, F)
    return history_levels(t, history, num_timesteps, context_noise), (~history).float()


def history_levels(
    t: torch.Tensor, history: torch.Tensor, num_timesteps: int, context_noise: float
) -> torch.Tensor:
    """t with the history frames set to 0 (clean), or with ``context_noise`` to a small level
    of their own in 0 .. bound: 0 stays among them, since sampling commits its history clean.
    Drawn after everything else, so the option changes no other draw."""
    if context_noise == 0.0:
        return t.masked_fill(history, 0)
    bound = max(1, int(context_noise * num_timesteps))
    noisy = torch.randint(0, bound + 1, t.shape, device=t.device)
    return torch.where(history, noisy, t)
