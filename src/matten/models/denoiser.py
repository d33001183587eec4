"""What every backbone shares: eps_theta(x_t, t, y[, actions]) over patches of a video latent,

    x (B, C, F, H, W) -> patches + fixed sin-cos positions -> Condition (noise level, class,
    action) -> blocks -> final layer -> unpatchify -> (B, C or 2C, F, H, W)

the predicted noise (and, when learning sigma, the variance interpolation). A backbone builds its
blocks and overrides only what differs: :meth:`Denoiser.positions` (which positions are added)
and :meth:`Denoiser.run_blocks` (what the blocks take besides the tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ssm import TokenGrid
from .embeddings import (
    ActionEmbedder,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    spatio_temporal_pos_embed,
    unpatchify,
)
from .layers import Condition, modulate, zero_modulation


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
            self.modulation = zero_modulation(dim, 2)

    def forward(self, x, cond: Condition, grid: TokenGrid):
        x = self.norm(x)
        if self.adaptive:
            shift, scale = self.modulation(cond.vector).chunk(2, dim=-1)
            x = modulate(x, shift, scale, grid)
        return self.linear(x)


class Denoiser(nn.Module):
    """The shared pipeline (see the module docstring) around ``make_blocks()``'s blocks.

    Class labels y (B,) and per-frame actions are optional inputs, present exactly when the model
    was built with ``num_classes`` / ``num_actions`` or ``action_dim``.
    """

    config: dict[str, Any]  # the constructor's arguments, enough to rebuild the model
    streams = False  # True for a backbone that generates chunk by chunk (init_state/step/commit)

    def __init__(
        self,
        make_blocks: Callable[[], Iterable[nn.Module]],
        hidden_size: int,
        patch_size: int = 2,
        in_channels: int = 4,
        learn_sigma: bool = True,
        num_classes: int = 0,
        class_dropout_prob: float = 0.1,
        conditioning: str = "adan",
        num_actions: int = 0,
        action_dim: int = 0,
        action_dropout_prob: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.patch_size, self.in_channels = patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size, self.conditioning = hidden_size, conditioning
        self.gradient_checkpointing = gradient_checkpointing
        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (
            LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        )
        self.action_embedder = (
            ActionEmbedder(hidden_size, num_actions, action_dim, action_dropout_prob)
            if num_actions > 0 or action_dim > 0
            else None
        )
        # Built in this order (embedders, blocks, final layer) so a seed draws the same weights.
        self.blocks = nn.ModuleList(make_blocks())
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, conditioning)

    # What samplers and the training loop ask of a model, whatever its kind.
    @property
    def num_classes(self) -> int:
        return self.y_embedder.num_classes if self.y_embedder is not None else 0

    @property
    def null_class(self) -> int | None:
        """Label of the null class used for classifier-free guidance (None if unconditional)."""
        return self.y_embedder.null_class if self.y_embedder is not None else None

    @property
    def null_action(self) -> int | None:
        """Index of the null action used for guidance on actions (None: not trained with one)."""
        return self.action_embedder.null_action if self.action_embedder is not None else None

    @property
    def takes_actions(self) -> bool:
        """Whether forward/step need per-frame ``actions`` (and refuse to run without them)."""
        return self.action_embedder is not None

    @property
    def num_actions(self) -> int:
        """How many discrete actions the model knows (0: none, or continuous actions)."""
        return self.action_embedder.num_actions if self.action_embedder is not None else 0

    @property
    def action_dim(self) -> int:
        """The size of a continuous action vector (0: none, or discrete actions)."""
        return self.action_embedder.action_dim if self.action_embedder is not None else 0

    def condition(
        self,
        t: Tensor,
        y: Tensor | None = None,
        actions: Tensor | None = None,
        *,
        frames: int,
        batch: int | None = None,
    ) -> Condition:
        """adan: one vector per frame, noise level (+ action) (+ class); tokens: the clip's noise
        level (+ class) as conditional tokens. t: (B,) or per-frame (B, F)."""
        batch = t.shape[0] if batch is None else batch
        if t.dim() == 1:
            t = t[:, None].expand(-1, frames)
        if t.shape != (batch, frames):
            raise ValueError(
                f"expected timesteps of shape ({batch},) or ({batch}, {frames}), "
                f"got {tuple(t.shape)}"
            )
        vector = self.t_embedder(t)  # (B, F, D)
        action_embedder, y_embedder = self.action_embedder, self.y_embedder
        if (actions is None) != (action_embedder is None):
            raise ValueError(
                "actions are required by an action-conditioned model and refused "
                "by one without actions"
            )
        if actions is not None and action_embedder is not None:
            vector = vector + action_embedder(actions, batch, frames)
        if (y is None) != (y_embedder is None):
            raise ValueError(
                "class labels y are required by a class-conditional model and "
                "refused by an unconditional one"
            )
        if y is not None and y.shape != (batch,):
            raise ValueError(f"expected labels of shape ({batch},), got {tuple(y.shape)}")
        y_emb = y_embedder(y) if y is not None and y_embedder is not None else None
        if self.conditioning == "adan":
            return Condition(vector=vector if y_emb is None else vector + y_emb[:, None])
        if not t.is_meta and not torch.equal(t, t[:, :1].expand_as(t)):
            raise ValueError("conditional tokens take one timestep per clip, not per frame")
        tokens = [vector[:, :1]] + ([y_emb[:, None]] if y_emb is not None else [])
        return Condition(tokens=torch.cat(tokens, dim=1))

    def token_grid(self, x: Tensor) -> TokenGrid:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected x of shape (B, {self.in_channels}, F, H, W), got {tuple(x.shape)}"
            )
        if x.shape[2] < 1:
            raise ValueError("x has no frames")
        p = self.patch_size
        return TokenGrid(x.shape[2], x.shape[3] // p, x.shape[4] // p)

    def positions(self, grid: TokenGrid, device, dtype) -> Tensor:
        """The fixed positions added to the patch tokens, (1, F*h*w, D): spatio-temporal."""
        return spatio_temporal_pos_embed(
            self.hidden_size, grid.frames, grid.height, grid.width, device=device, dtype=dtype
        )

    def run_blocks(self, tokens: Tensor, cond: Condition, grid: TokenGrid):
        """The blocks over the tokens -> (tokens, what they carry to the next call: None)."""
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                tokens = checkpoint(block, tokens, cond, grid, use_reentrant=False)
            else:
                tokens = block(tokens, cond, grid)
        return tokens, None

    def denoise(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        actions: Tensor | None = None,
        **block_inputs,
    ):
        """The pipeline -> (output (B, out_channels, F, H, W), what :meth:`run_blocks` carries)."""
        grid = self.token_grid(x)
        tokens = self.patch_embed(x)
        tokens = tokens + self.positions(grid, x.device, tokens.dtype)
        cond = self.condition(t, y, actions, frames=grid.frames, batch=x.shape[0])
        tokens, carried = self.run_blocks(tokens, cond, grid, **block_inputs)
        out = self.final_layer(tokens, cond, grid)
        return unpatchify(
            out, grid.frames, grid.height, grid.width, self.patch_size, self.out_channels
        ), carried

    def forward(
        self, x: Tensor, t: Tensor, y: Tensor | None = None, actions: Tensor | None = None
    ) -> Tensor:
        """x (B, C, F, H, W), t (B,) or per-frame (B, F), y (B,), actions (B, F) or
        (B, F, action_dim) -> (B, out_channels, F, H, W)."""
        return self.denoise(x, t, y, actions)[0]
