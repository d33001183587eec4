"""The denoising backbone: Matten's four variants and the Latte baseline as compositions of layers.

    x (B, C, F, H, W) -> patches + fixed spatio-temporal positions -> depth x block -> final layer
    -> (B, C or 2C, F, H, W): predicted noise (and the learned-variance interpolation when learning
    sigma).

A *block* is a short list of (layer kind, view) pairs, repeated ``depth`` times (``LAYOUTS``):

    variant 1  global bidirectional Mamba                                    (paper Fig. 3a)
    variant 2  spatial bidirectional Mamba, temporal bidirectional Mamba      (Fig. 3b)
    variant 3  spatial attention, temporal attention, global Mamba (default)  (Fig. 3c)
    variant 4  temporal attention, global Mamba                               (Fig. 3d)
    latte      spatial attention, temporal attention                          (Latte, no Mamba)

Attention layers carry a 4x MLP; Mamba layers do not. The conditioning mode ("adan" or "tokens")
is described in :mod:`matten.models.layers`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ssm import TokenGrid
from .embeddings import (LabelEmbedder, PatchEmbed, TimestepEmbedder, spatio_temporal_pos_embed,
                         unpatchify)
from .layers import AttentionLayer, Condition, MambaLayer, modulate

LAYOUTS = {
    1: (("mamba", "global"),),
    2: (("mamba", "spatial"), ("mamba", "temporal")),
    3: (("attention", "spatial"), ("attention", "temporal"), ("mamba", "global")),
    4: (("attention", "temporal"), ("mamba", "global")),
    "latte": (("attention", "spatial"), ("attention", "temporal")),
}


class Block(nn.Module):
    def __init__(self, layout, dim: int, num_heads: int, conditioning: str, mlp_ratio: float,
                 d_state: int, expand: int):
        super().__init__()
        self.layers = nn.ModuleList(
            AttentionLayer(dim, num_heads, view, conditioning, mlp_ratio) if kind == "attention"
            else MambaLayer(dim, view, conditioning, d_state, expand)
            for kind, view in layout)

    def forward(self, x, cond: Condition, grid: TokenGrid):
        for layer in self.layers:
            x = layer(x, cond, grid)
        return x


class FinalLayer(nn.Module):
    """Norm (adaLN shift/scale, or affine), then a zero-initialised linear map to patch pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, conditioning: str):
        super().__init__()
        self.adaptive = conditioning == "adan"
        self.norm = nn.LayerNorm(dim, elementwise_affine=not self.adaptive, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        if self.adaptive:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
            nn.init.zeros_(self.modulation[1].weight)
            nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x, cond: Condition, grid: TokenGrid):
        x = self.norm(x)
        if self.adaptive:
            shift, scale = self.modulation(cond.vector).chunk(2, dim=-1)
            x = modulate(x, shift, scale, grid)
        return self.linear(x)


class ClassConditioned:
    """What samplers ask of a backbone with an optional ``y_embedder`` (a LabelEmbedder)."""

    @property
    def num_classes(self) -> int:
        return self.y_embedder.num_classes if self.y_embedder is not None else 0

    @property
    def null_class(self) -> int | None:
        """Label of the null class used for classifier-free guidance (None if unconditional)."""
        return self.y_embedder.null_class if self.y_embedder is not None else None


class VideoBackbone(ClassConditioned, nn.Module):
    """eps_theta(x_t, t, y): a stack of blocks of one layout over video latent patches."""

    def __init__(self, layout, depth: int, hidden_size: int, num_heads: int, patch_size: int = 2,
                 in_channels: int = 4, learn_sigma: bool = True, num_classes: int = 0,
                 class_dropout_prob: float = 0.1, conditioning: str = "adan",
                 mlp_ratio: float = 4.0, d_state: int = 16, expand: int = 2,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.patch_size, self.in_channels = patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size, self.conditioning = hidden_size, conditioning
        self.gradient_checkpointing = gradient_checkpointing
        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
                           if num_classes > 0 else None)
        self.blocks = nn.ModuleList(
            Block(layout, hidden_size, num_heads, conditioning, mlp_ratio, d_state, expand)
            for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, conditioning)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, frames: int) -> Condition:
        if t.dim() == 1:
            t = t[:, None].expand(-1, frames)
        if t.shape[1] != frames:
            raise ValueError(f"per-frame timesteps have {t.shape[1]} frames, the video has {frames}")
        t_emb = self.t_embedder(t)  # (B, F, D)
        if (y is None) != (self.y_embedder is None):
            raise ValueError("class labels y are required by a class-conditional model and "
                             "refused by an unconditional one")
        y_emb = self.y_embedder(y) if y is not None else None
        if self.conditioning == "adan":
            return Condition(vector=t_emb if y_emb is None else t_emb + y_emb[:, None])
        if not t.is_meta and not torch.equal(t, t[:, :1].expand_as(t)):
            raise ValueError("conditional tokens take one timestep per clip, not per frame")
        tokens = [t_emb[:, :1]] + ([y_emb[:, None]] if y_emb is not None else [])
        return Condition(tokens=torch.cat(tokens, dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """x (B, C, F, H, W), t (B,) or per-frame (B, F), y (B,) -> (B, out_channels, F, H, W)."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, F, H, W), "
                             f"got {tuple(x.shape)}")
        _, _, frames, height, width = x.shape
        p = self.patch_size
        grid = TokenGrid(frames, height // p, width // p)
        tokens = self.patch_embed(x)
        tokens = tokens + spatio_temporal_pos_embed(self.hidden_size, *grid_shape(grid),
                                                    device=x.device, dtype=tokens.dtype)
        cond = self.condition(t, y, frames)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, tokens, cond, grid, use_reentrant=False)
            else:
                tokens = block(tokens, cond, grid)
        out = self.final_layer(tokens, cond, grid)
        return unpatchify(out, frames, grid.height, grid.width, p, self.out_channels)


def grid_shape(grid: TokenGrid) -> tuple[int, int, int]:
    return grid.frames, grid.height, grid.width
