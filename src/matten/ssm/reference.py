"""The selective scan written as the plain recurrence, in float64, for tests and benchmarks.

It materialises the discretised (batch, dim, L, N) tensors and steps through time in Python: slow,
memory-hungry and obviously correct. Nothing in the library calls it. It expands B and C to one
(batch, dim, N, L) tensor per channel on its own, without the helpers the kernels share, so that
it stays an independent check of their layout handling too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_channel(X, batch, dim, length):
    """B or C in any layout as (batch, dim, N, L): every channel's own coefficients."""
    if X.dim() == 2:  # constant (dim, N)
        return X[None, :, :, None].expand(batch, dim, X.shape[1], length)
    if X.dim() == 3:  # variable (batch, N, L): every channel shares it
        return X[:, None].expand(batch, dim, *X.shape[1:])
    # grouped (batch, G, N, L): channel d reads group d // (dim // G)
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    initial_state=None,
    dtype=torch.float64,
):
    """Mamba's S6 recurrence, step by step (same layouts as :func:`matten.ssm.selective_scan`).

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t      (ZOH for A, Euler for B, as Mamba)
    y_t = <C_t, h_t> + D * u_t,   out = y * silu(z)
    """
    in_dtype = u.dtype
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    B, C = _per_channel(B, batch, dim, length), _per_channel(C, batch, dim, length)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(length):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]
        ys.append(torch.einsum("bdn,bdn->bd", h, C[..., t]))
    y = torch.stack(ys, dim=2)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    y = y.to(in_dtype)
    return (y, h.to(in_dtype)) if return_last_state else y
