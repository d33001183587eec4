"""Multi-head self-attention (torch's scaled_dot_product_attention) and the transformer MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Self-attention over (batch, L, dim); flash / memory-efficient kernels on GPU via SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch, L, dim) -> q, k, v, each (batch, heads, L, head_dim); lets callers cache k, v."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries against (possibly cached, longer) keys and values -> (batch, Lq, dim).

        ``attn_mask``: boolean (Lq, Lk) or broadcastable, True where a query may attend."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        batch, _, length, _ = q.shape
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.attend(*self.project(x), attn_mask=attn_mask)


class Mlp(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear, hidden width ``ratio`` x dim (DiT/Latte)."""

    def __init__(self, dim: int, ratio: float = 4.0):
        hidden = int(dim * ratio)
        super().__init__(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
