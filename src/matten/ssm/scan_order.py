"""Scan orders over a video token grid (frames F, height h, width w).

Tokens are kept in the spatial-first global order: every token of frame 1 in raster order, then
frame 2, ... (VideoMamba's "spatial-first scan", Matten Sec. 3.2). From there a block can view the
same tokens as F per-frame spatial sequences of h*w tokens, or as h*w per-position temporal
sequences of F tokens. Every function has an exact inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange


@dataclass(frozen=True)
class TokenGrid:
    frames: int
    height: int
    width: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    def check(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 3 or tokens.shape[1] != self.num_tokens:
            raise ValueError(
                f"expected tokens (batch, {self.num_tokens}, dim) for grid "
                f"{self.frames}x{self.height}x{self.width}, got {tuple(tokens.shape)}"
            )


def grid_to_global(grid_tokens: torch.Tensor) -> torch.Tensor:
    """(batch, F, h, w, dim) -> (batch, F*h*w, dim) in spatial-first order."""
    return rearrange(grid_tokens, "b f h w d -> b (f h w) d")


def global_to_grid(tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Inverse of :func:`grid_to_global`."""
    grid.check(tokens)
    return rearrange(tokens, "b (f h w) d -> b f h w d", f=grid.frames, h=grid.height, w=grid.width)


def global_to_spatial(tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """(batch, F*h*w, dim) -> (batch*F, h*w, dim): one sequence per frame."""
    grid.check(tokens)
    return rearrange(tokens, "b (f s) d -> (b f) s d", f=grid.frames)


def spatial_to_global(tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Inverse of :func:`global_to_spatial`."""
    return rearrange(tokens, "(b f) s d -> b (f s) d", f=grid.frames)


def global_to_temporal(tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """(batch, F*h*w, dim) -> (batch*h*w, F, dim): one sequence per spatial position."""
    grid.check(tokens)
    return rearrange(tokens, "b (f s) d -> (b s) f d", f=grid.frames)


def temporal_to_global(tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Inverse of :func:`global_to_temporal`."""
    return rearrange(tokens, "(b s) f d -> b (f s) d", s=grid.tokens_per_frame)
