"""Device-agnostic selective scan in plain PyTorch: a two-level chunked recurrence.

The sequence is cut into ``nc`` chunks of ``T`` steps (T ~ sqrt(L)). All chunks advance together
through their T steps from a zero state (phase 1); a short scan over chunks then carries each
chunk's end state into the next one, using the chunk's total decay exp(A * sum(delta)) (phase 2);
finally all chunks run their T steps again from the right initial state and emit outputs
(phase 3). That is 2T + nc Python steps instead of L, each one a batched tensor op, so it suits a
GPU when the ``mamba_ssm`` kernels are not installed. Autograd is PyTorch's own.
Padding steps use delta = 0 (decay 1, no input), which leaves the state untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def chunked_scan(u, delta, A, B, C, h0, chunk: int | None = None):
    """Bare recurrence (no D, no z): returns y (batch, dim, L) and the last state (batch, dim, N)."""
    batch, dim, length = u.shape
    T = chunk or max(1, math.isqrt(length - 1) + 1)
    nc = -(-length // T)
    pad = nc * T - length
    if pad:
        u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
        B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    # (batch, dim, nc, T) and (batch, 1, nc, T, N): chunk k, step t is position k * T + t.
    delta_c = delta.view(batch, dim, nc, T)
    du_c = (delta * u).view(batch, dim, nc, T)
    B_c = B.view(batch, -1, nc, T).permute(0, 2, 3, 1).unsqueeze(1)
    C_c = C.view(batch, -1, nc, T).permute(0, 2, 3, 1).unsqueeze(1)
    A_ = A[:, None, :]  # (dim, 1, N) broadcasts over chunks

    def run_chunks(h):
        ys = []
        for t in range(T):
            dt = delta_c[..., t, None]
            h = torch.exp(dt * A_) * h + du_c[..., t, None] * B_c[:, :, :, t]
            ys.append((h * C_c[:, :, :, t]).sum(-1))
        return h, ys

    local_end, _ = run_chunks(u.new_zeros(batch, dim, nc, A.shape[1]))
    chunk_decay = torch.exp(delta_c.sum(-1, keepdim=True) * A_)
    carries, h = [], h0
    for k in range(nc):
        carries.append(h)
        h = chunk_decay[:, :, k] * h + local_end[:, :, k]
    _, ys = run_chunks(torch.stack(carries, dim=2))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, nc * T)[..., :length]
    return y, h
