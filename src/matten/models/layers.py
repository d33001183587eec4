"""The two kinds of layer of the clip backbones, each over a sequence view of the tokens.

* :class:`AttentionLayer` — a transformer layer (self-attention, then a 4x MLP), as in DiT/Latte;
* :class:`MambaLayer` — a bidirectional Mamba scan (Vision Mamba), as in Matten.

The causal backbone adds a third on the same base: :class:`~matten.models.hybrid.HybridMemoryLayer`.

A *view* says which tokens form one sequence (see :mod:`matten.ssm.scan_order`): ``"global"`` (all
F*h*w tokens, spatial-first), ``"spatial"`` (the h*w tokens of one frame) or ``"temporal"`` (the F
tokens at one position). Tokens always travel between layers in the global order.

Conditioning c (timestep + class) enters one of two ways, chosen per model:

* ``"adan"``: adaptive normalisation. Attention layers use DiT's adaLN-Zero (6 vectors: shift, scale
  and gate for attention and for the MLP). Mamba layers use the paper's M-AdaN (Sec. 3.3) with 3
  vectors, AdaN(f, c) = gamma_c Norm(f) + beta_c and RCs(f, c) = alpha_c f + MambaScans(AdaN(f, c)),
  parameterised as gamma = 1 + g, alpha = 1 + a with (g, beta, a) from a zero-initialised linear
  layer, and the Mamba out_proj zero-initialised: every layer starts as the identity.
* ``"tokens"``: conditional tokens (DiS). The embeddings of c join every sequence as extra tokens:
  in front for attention, at both ends for Mamba so that the forward and the backward scan each
  meet them before any video token. Norms are ordinary affine LayerNorms.

c may differ per frame (a (B, F, D) tensor, for per-frame noise levels); "tokens" takes one per
clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from einops import repeat
from torch import nn

from ..ssm import BiMamba, TokenGrid
from ..ssm import scan_order as order
from .attention import Attention, Mlp

CONDITIONING_MODES = ("adan", "tokens")
VIEWS = ("global", "spatial", "temporal")


@dataclass
class Condition:
    """What a layer is conditioned on: a vector per frame (adan) or a few tokens per clip
    (tokens)."""

    vector: torch.Tensor | None = None  # (B, F, D)
    tokens: torch.Tensor | None = None  # (B, K, D)


def to_sequences(x: torch.Tensor, view: str, grid: TokenGrid) -> torch.Tensor:
    if view == "global":
        return x
    return (order.global_to_spatial if view == "spatial" else order.global_to_temporal)(x, grid)


def from_sequences(x: torch.Tensor, view: str, grid: TokenGrid) -> torch.Tensor:
    if view == "global":
        return x
    return (order.spatial_to_global if view == "spatial" else order.temporal_to_global)(x, grid)


def per_sequence(tokens: torch.Tensor, view: str, grid: TokenGrid) -> torch.Tensor:
    """Repeat per-clip tokens (B, K, D) for each sequence of the view."""
    if view == "global":
        return tokens
    copies = grid.frames if view == "spatial" else grid.tokens_per_frame
    return repeat(tokens, "b k d -> (b n) k d", n=copies)


def modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, grid: TokenGrid
) -> torch.Tensor:
    """x * (1 + scale) + shift with per-frame (B, F, D) modulation of (B, F*h*w, D) tokens."""
    x = x.view(x.shape[0], grid.frames, grid.tokens_per_frame, -1)
    return (x * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def gated(x: torch.Tensor, gate: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    x = x.view(x.shape[0], grid.frames, grid.tokens_per_frame, -1)
    return (x * gate[:, :, None]).flatten(1, 2)


def zero_modulation(dim: int, count: int) -> nn.Sequential:
    """c -> ``count`` modulation vectors, zero-initialised so that a fresh layer is the identity."""
    linear = nn.Linear(dim, count * dim)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.SiLU(), linear)


class ConditionedLayer(nn.Module):
    """Shared plumbing: the view, the conditioning mode, the adaptive-norm modulation, running a
    mixer over the view. Layers with an MLP name it ``mlp`` after a norm ``norm2``."""

    num_modulations = 0
    cond_at_both_ends = False
    mlp: nn.Module  # set by the layers that have an MLP, with its norm
    norm2: nn.Module

    def __init__(self, dim: int, view: str, conditioning: str, build_modulation: bool = True):
        super().__init__()
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(
                f"unknown conditioning {conditioning!r}; expected {CONDITIONING_MODES}"
            )
        self.view, self.conditioning = view, conditioning
        adaptive = conditioning == "adan"
        self.norm_kwargs: dict[str, Any] = dict(elementwise_affine=not adaptive, eps=1e-6)
        self.modulation: nn.Module | None = None
        if adaptive and build_modulation:
            self.modulation = zero_modulation(dim, self.num_modulations)

    def modulations(self, cond: Condition) -> tuple[torch.Tensor, ...]:
        if self.modulation is None:
            raise RuntimeError(
                f"this layer has no adaptive-norm modulation (conditioning {self.conditioning!r})"
            )
        return self.modulation(cond.vector).chunk(self.num_modulations, dim=-1)

    def mlp_residual(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        scale: torch.Tensor,
        gate: torch.Tensor,
        grid: TokenGrid,
    ) -> torch.Tensor:
        """x + gate * MLP(AdaN(x)): the second half of an adaLN-Zero transformer layer."""
        return x + gated(self.mlp(modulate(self.norm2(x), shift, scale, grid)), gate, grid)

    def mix(self, mixer: nn.Module, x: torch.Tensor, cond: Condition, grid: TokenGrid):
        seqs = to_sequences(x, self.view, grid)
        if self.conditioning == "tokens":
            if cond.tokens is None:
                raise ValueError("conditional-token layers need the condition's tokens")
            extra = per_sequence(cond.tokens, self.view, grid).to(seqs.dtype)
            k = extra.shape[1]
            parts = [extra, seqs, extra] if self.cond_at_both_ends else [extra, seqs]
            seqs = mixer(torch.cat(parts, dim=1))[:, k : k + seqs.shape[1]]
        else:
            seqs = mixer(seqs)
        return from_sequences(seqs, self.view, grid)


class AttentionLayer(ConditionedLayer):
    """Self-attention over the view, then an MLP; adaLN-Zero or conditional tokens."""

    num_modulations = 6

    def __init__(
        self,
        dim: int,
        num_heads: int,
        view: str,
        conditioning: str = "adan",
        mlp_ratio: float = 4.0,
    ):
        super().__init__(dim, view, conditioning)
        self.norm1 = nn.LayerNorm(dim, **self.norm_kwargs)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, **self.norm_kwargs)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, cond: Condition, grid: TokenGrid) -> torch.Tensor:
        if self.conditioning == "tokens":
            x = x + self.mix(self.attn, self.norm1(x), cond, grid)
            return x + self.mlp(self.norm2(x))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulations(cond)
        x = x + gated(
            self.mix(self.attn, modulate(self.norm1(x), shift_a, scale_a, grid), cond, grid),
            gate_a,
            grid,
        )
        return self.mlp_residual(x, shift_m, scale_m, gate_m, grid)


class MambaLayer(ConditionedLayer):
    """Bidirectional Mamba over the view; M-AdaN or conditional tokens."""

    num_modulations = 3
    cond_at_both_ends = True

    def __init__(
        self, dim: int, view: str, conditioning: str = "adan", d_state: int = 16, expand: int = 2
    ):
        super().__init__(dim, view, conditioning)
        self.norm = nn.LayerNorm(dim, **self.norm_kwargs)
        self.mamba = BiMamba(dim, d_state=d_state, expand=expand)
        if conditioning == "adan":
            nn.init.zeros_(self.mamba.out_proj.weight)

    def forward(self, x: torch.Tensor, cond: Condition, grid: TokenGrid) -> torch.Tensor:
        if self.conditioning == "tokens":
            return x + self.mix(self.mamba, self.norm(x), cond, grid)
        g, beta, a = self.modulations(cond)
        adan = modulate(self.norm(x), beta, g, grid)  # gamma = 1 + g
        return gated(x, 1 + a, grid) + self.mix(self.mamba, adan, cond, grid)  # alpha = 1 + a
