"""Device-agnostic selective scan in plain PyTorch: a two-level chunked recurrence.

The sequence is cut into ``nc`` chunks of ``T`` steps (T ~ sqrt(L)). All chunks advance together
through their T steps from a zero state (phase 1); a short scan over chunks then carries each
chunk's end state into the next one, using the chunk's total decay exp(A * sum(delta)) (phase 2);
finally all chunks run their T steps again from the right initial state and emit outputs
(phase 3). That is 2T + nc Python steps instead of L, each one a batched tensor op, so it suits a
GPU when neither the ``mamba_ssm`` nor the Triton kernels can run. Autograd is PyTorch's own.
Padding steps use delta = 0 (decay 1, no input), which leaves the state untouched.

B and C may have any of the layouts of :mod:`matten.ssm.layouts`. The state is held as
(batch, G, dim // G, nc, N) so that a group's B_t broadcasts over its channels; a constant B is
used as it is at every step, never expanded along time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import layouts


def _steps(X, nc, T, pad):
    """B or C -> a function of the step t within a chunk returning a tensor that broadcasts
    against the (batch, G, dim // G, nc, N) state."""
    X4 = layouts.as_grouped(X)  # (batch or 1, G, N, L or 1)
    if X4.shape[-1] == 1:  # constant in time: (1, G, 1, 1, N) at every step
        const = X4[..., 0][:, :, None, None, :]
        return lambda t: const
    if pad:
        X4 = F.pad(X4, (0, pad))
    # (batch, G, 1, nc, T, N): chunk k, step t is position k * T + t.
    chunked = X4.unflatten(-1, (nc, T)).permute(0, 1, 3, 4, 2).unsqueeze(2)
    return lambda t: chunked[:, :, :, :, t]


def _groups(X, dim):
    return 1 if X.dim() == 3 else X.shape[0] if X.dim() == 2 else X.shape[1]


def chunked_scan(u, delta, A, B, C, h0, chunk: int | None = None):
    """Bare recurrence (no D, no z): returns y (batch, dim, L) and the last state (batch, dim,
    N)."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    T = chunk or max(1, math.isqrt(length - 1) + 1)
    nc = -(-length // T)
    pad = nc * T - length
    if pad:
        u, delta = F.pad(u, (0, pad)), F.pad(delta, (0, pad))
    # Channels split as (G, dim // G) with G the finer of B's and C's groupings (a multiple of
    # the other, both dividing dim), so that both broadcast.
    G = math.lcm(_groups(B, dim), _groups(C, dim))
    B_at, C_at = _steps(B, nc, T, pad), _steps(C, nc, T, pad)
    B_at, C_at = _refined(B_at, G), _refined(C_at, G)
    shape = (batch, G, dim // G, nc)
    delta_c = delta.reshape(*shape, T)
    du_c = (delta * u).reshape(*shape, T)
    A_ = A.view(G, dim // G, 1, nstate)  # broadcasts over batch and chunks

    def run_chunks(h):
        ys = []
        for t in range(T):
            dt = delta_c[..., t, None]
            h = torch.exp(dt * A_) * h + du_c[..., t, None] * B_at(t)
            ys.append((h * C_at(t)).sum(-1))
        return h, ys

    local_end, _ = run_chunks(u.new_zeros(*shape, nstate))
    chunk_decay = torch.exp(delta_c.sum(-1, keepdim=True) * A_)
    carries, h = [], h0.view(batch, G, dim // G, nstate)
    for k in range(nc):
        carries.append(h)
        h = chunk_decay[..., k, :] * h + local_end[..., k, :]
    _, ys = run_chunks(torch.stack(carries, dim=3))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, nc * T)[..., :length]
    return y, h.reshape(batch, dim, nstate)


def _refined(at, G):
    """Make a per-step coefficient with g groups (g dividing G) broadcast over G groups."""

    def refined(t):
        X = at(t)  # (b, g, 1 or dim // G', nc or 1, N)
        g = X.shape[1]
        if g in (1, G):  # one group broadcasts as it is
            return X
        # Each of the g groups covers G // g of the finer ones, whose channels are contiguous.
        X = X.unsqueeze(2).expand(X.shape[0], g, G // g, *X.shape[2:])
        return X.reshape(X.shape[0], G, *X.shape[3:])

    return refined
