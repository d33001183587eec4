"""Noise levels for diffusion forcing: one per frame, so a causal model learns to denoise the next
frames whatever state its history is in.

Independent levels alone rarely show the model what autoregressive generation gives it: a long
run of *clean* frames (committed at t = 0) followed by the frames being denoised. Frames far back
are then clean only by chance, so a long-range memory is trained mostly on noise and is out of
distribution when it is finally written with clean frames. ``history_prob`` mixes in that case:
a clip's first frames, a random number of them, are given clean and left out of the loss.
"""

from __future__ import annotations

import torch


def forcing_timesteps(batch: int, frames: int, num_timesteps: int, history_prob: float = 0.0,
                      device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-frame timesteps t (B, F) and per-frame loss weights (B, F), or None when every frame
    counts.

    Every frame draws its own level uniformly from [0, num_timesteps). With probability
    ``history_prob`` a clip instead keeps its first n frames clean (t = 0, weight 0), n uniform in
    1 .. F - 1, and the rest keep their independent levels.
    """
    if not 0.0 <= history_prob <= 1.0:
        raise ValueError(f"history_prob must be in [0, 1], got {history_prob}")
    t = torch.randint(0, num_timesteps, (batch, frames), device=device)
    if history_prob == 0.0 or frames < 2:
        return t, None
    with_history = torch.rand(batch, device=device) < history_prob
    length = torch.randint(1, frames, (batch,), device=device) * with_history
    history = torch.arange(frames, device=device)[None] < length[:, None]      # (B, F)
    return t.masked_fill(history, 0), (~history).float()
