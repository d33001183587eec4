"""Inputs of the backbones: patches of the video latent, fixed sin-cos positions, timestep, class
and per-frame action."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from einops import rearrange
from torch import nn


class PatchEmbed(nn.Module):
    """(B, C, F, H, W) -> (B, F*h*w, D) tokens in spatial-first order; patches are p x p per
    frame."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, frames, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch size {p}")
        x = self.proj(rearrange(x, "b c f h w -> (b f) c h w"))
        return rearrange(x, "(b f) d h w -> b (f h w) d", b=batch)


def unpatchify(
    tokens: torch.Tensor, frames: int, height: int, width: int, patch_size: int, channels: int
) -> torch.Tensor:
    """(B, F*h*w, p*p*C) -> (B, C, F, h*p, w*p), the inverse of the patch layout."""
    return rearrange(
        tokens,
        "b (f h w) (p q c) -> b c f (h p) (w q)",
        f=frames,
        h=height,
        w=width,
        p=patch_size,
        q=patch_size,
        c=channels,
    )


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Transformer sin-cos embedding (len(positions), dim): sin on the first half, cos on the
    second."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=16)
def _spatial_table(dim: int, height: int, width: int) -> np.ndarray:
    # Half of the channels encode the row, half the column (as DiT).
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], axis=1)


@functools.lru_cache(maxsize=16)
def _spatio_temporal_table(dim: int, frames: int, height: int, width: int) -> np.ndarray:
    # Temporal: all channels encode the frame index (as Latte), added to the spatial table.
    temporal = sincos_1d(dim, np.arange(frames))
    spatial = _spatial_table(dim, height, width)
    return (temporal[:, None, :] + spatial[None, :, :]).reshape(frames * height * width, dim)


def _as_embedding(table_fn, dim: int, *sizes, device=None, dtype=torch.float32) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be a multiple of 4 for the sin-cos embedding")
    return torch.from_numpy(table_fn(dim, *sizes)).to(device=device, dtype=dtype)[None]


def spatio_temporal_pos_embed(
    dim: int, frames: int, height: int, width: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Fixed embedding p of the paper's z = z_hat + p: (1, F*h*w, dim), spatial-first order."""
    return _as_embedding(
        _spatio_temporal_table, dim, frames, height, width, device=device, dtype=dtype
    )


def spatial_pos_embed(
    dim: int, height: int, width: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (1, h*w, dim), the same for every frame."""
    return _as_embedding(_spatial_table, dim, height, width, device=device, dtype=dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep, then a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[..., None] * freqs
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # type: ignore[arg-type]


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, the null class, for classifier-free guidance.

    During training each label is replaced by the null class with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if not labels.is_meta and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(
                f"class labels must be in [0, {self.num_classes}] "
                f"({self.num_classes} is the null class), got {labels.tolist()}"
            )
        if self.training:
            labels = dropped_to_null(labels, self.null_class, self.dropout_prob)
        return self.embedding(labels)


def dropped_to_null(indices: torch.Tensor, null: int, prob: float) -> torch.Tensor:
    """``indices`` with each one replaced by ``null`` with probability ``prob``: the condition
    dropout that teaches a model the "no condition" classifier-free guidance contrasts with."""
    if prob <= 0:
        return indices
    drop = torch.rand(indices.shape, device=indices.device) < prob
    return torch.where(drop, torch.full_like(indices, null), indices)


class ActionEmbedder(nn.Module):
    """Per-frame actions -> (B, F, D), added to the noise-level embedding: discrete actions
    (B, F) through a table, continuous ones (B, F, action_dim) through an MLP.

    With ``dropout_prob`` > 0 (discrete actions only) the table has one more row, the null
    action (index ``num_actions``): during training each frame's action is replaced by it with
    that probability, so that the model also learns frames whose action is unknown, what
    classifier-free guidance on actions contrasts a held action with."""

    def __init__(
        self, hidden_size: int, num_actions: int = 0, action_dim: int = 0, dropout_prob=0.0
    ):
        super().__init__()
        if (num_actions > 0) == (action_dim > 0):
            raise ValueError("give either num_actions (discrete) or action_dim (continuous)")
        if not 0.0 <= dropout_prob < 1.0 or (dropout_prob > 0 and not num_actions):
            raise ValueError(
                f"action dropout must be in [0, 1), and only for discrete actions: {dropout_prob}"
            )
        self.num_actions, self.action_dim = num_actions, action_dim
        self.dropout_prob = dropout_prob
        self.embed: nn.Module
        if num_actions:
            self.embed = nn.Embedding(num_actions + (dropout_prob > 0), hidden_size)
        else:
            self.embed = nn.Sequential(
                nn.Linear(action_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )

    @property
    def null_action(self) -> int | None:
        """Index of the null action (None: the model was trained without action dropout)."""
        return self.num_actions if self.dropout_prob > 0 else None

    def forward(self, actions: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        if self.num_actions:
            if actions.shape != (batch, frames) or actions.is_floating_point():
                raise ValueError(
                    f"expected integer actions of shape ({batch}, {frames}), got "
                    f"{actions.dtype} {tuple(actions.shape)}"
                )
            # The null action is for sampling (guidance); training data never carry it, so
            # that an off-by-one action count fails here instead of training as "unknown".
            rows = self.num_actions + (self.null_action is not None and not self.training)
            if actions.min() < 0 or actions.max() >= rows:
                null = (
                    f" ({self.num_actions} is the null action)" if rows > self.num_actions else ""
                )
                raise ValueError(f"actions must be in [0, {rows}){null}")
            if self.training:
                actions = dropped_to_null(actions, self.num_actions, self.dropout_prob)
            return self.embed(actions)
        if actions.shape != (batch, frames, self.action_dim):
            raise ValueError(
                f"expected actions of shape ({batch}, {frames}, {self.action_dim}), "
                f"got {tuple(actions.shape)}"
            )
        return self.embed(actions.to(next(self.embed.parameters()).dtype))
