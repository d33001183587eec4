"""The clip backbone: Matten's four variants and the Latte baseline as compositions of layers.

    x (B, C, F, H, W) -> patches + fixed spatio-temporal positions -> depth x block -> final layer
    -> (B, C or 2C, F, H, W): predicted noise (and the learned-variance interpolation when learning
    sigma); the pipeline is :class:`~matten.models.denoiser.Denoiser`'s.

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

from torch import nn

from ..ssm import TokenGrid
from .denoiser import Denoiser
from .layers import AttentionLayer, Condition, MambaLayer

LAYOUTS = {
    1: (("mamba", "global"),),
    2: (("mamba", "spatial"), ("mamba", "temporal")),
    3: (("attention", "spatial"), ("attention", "temporal"), ("mamba", "global")),
    4: (("attention", "temporal"), ("mamba", "global")),
    "latte": (("attention", "spatial"), ("attention", "temporal")),
}


class Block(nn.Module):
    def __init__(
        self,
        layout,
        dim: int,
        num_heads: int,
        conditioning: str,
        mlp_ratio: float,
        d_state: int,
        expand: int,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            AttentionLayer(dim, num_heads, view, conditioning, mlp_ratio)
            if kind == "attention"
            else MambaLayer(dim, view, conditioning, d_state, expand)
            for kind, view in layout
        )

    def forward(self, x, cond: Condition, grid: TokenGrid):
        for layer in self.layers:
            x = layer(x, cond, grid)
        return x


class VideoBackbone(Denoiser):
    """eps_theta(x_t, t, y): a stack of blocks of one layout over video latent patches."""

    def __init__(
        self,
        layout,
        depth: int,
        hidden_size: int,
        num_heads: int,
        patch_size: int = 2,
        in_channels: int = 4,
        learn_sigma: bool = True,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        conditioning: str = "adan",
        mlp_ratio: float = 4.0,
        d_state: int = 16,
        expand: int = 2,
        gradient_checkpointing: bool = False,
    ):
        def make_blocks():
            return (
                Block(layout, hidden_size, num_heads, conditioning, mlp_ratio, d_state, expand)
                for _ in range(depth)
            )

        super().__init__(
            make_blocks,
            hidden_size,
            patch_size=patch_size,
            in_channels=in_channels,
            learn_sigma=learn_sigma,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
            conditioning=conditioning,
            gradient_checkpointing=gradient_checkpointing,
        )
