"""``selective_scan``: Mamba's S6 scan with the call signature of ``mamba_ssm``'s ``selective_scan_fn``.

Dispatch, by device:
  * CUDA with ``mamba_ssm`` importable -> its fused kernel (unless an initial state is given,
    which that kernel does not take);
  * CUDA otherwise (or any non-CPU device) -> :func:`matten.ssm.chunked_scan.chunked_scan`;
  * CPU -> the compiled kernels of :mod:`matten.ssm.cpu_kernel`, with a hand-written backward.

Discretisation follows Mamba: A_bar = exp(delta * A) (zero-order hold) and B_bar * u = delta * B * u
(the first-order simplification of the paper's Eq. 3 that Mamba's kernels use).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import cpu_kernel
from .chunked_scan import chunked_scan


@functools.lru_cache(maxsize=1)
def mamba_ssm_scan():
    """``mamba_ssm``'s ``selective_scan_fn`` if that package imports, else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a build that fails to load its CUDA library
        return None
    return selective_scan_fn


class _CPUScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        y, h_last = cpu_kernel.scan_forward(u, delta, A, B, C, h0)
        ctx.save_for_backward(u, delta, A, B, C, h0)
        return y, h_last

    @staticmethod
    def backward(ctx, dy, dh_last):
        u, delta, A, B, C, h0 = ctx.saved_tensors
        dy = torch.zeros_like(u) if dy is None else dy
        dh_last = torch.zeros_like(h0) if dh_last is None else dh_last
        return cpu_kernel.scan_backward(u, delta, A, B, C, h0, dy, dh_last)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    nstate = A.shape[-1] if A.dim() == 2 else -1
    expected = {"delta": (delta, (batch, dim, length)), "A": (A, (dim, nstate)),
                "B": (B, (batch, nstate, length)), "C": (C, (batch, nstate, length)),
                "D": (D, (dim,)), "z": (z, (batch, dim, length)), "delta_bias": (delta_bias, (dim,)),
                "initial_state": (initial_state, (batch, dim, nstate))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape} for u of shape "
                             f"{tuple(u.shape)} and A of shape {tuple(A.shape)}, got {tuple(tensor.shape)}")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """Selective scan ``y_t = <C_t, h_t> + D u_t`` with ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``.

    Layouts as in ``mamba_ssm``: u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L);
    D, delta_bias: (dim,). ``delta_bias`` is added and ``softplus`` applied to delta first; the output
    is gated by ``silu(z)``. ``initial_state`` (batch, dim, N) starts the recurrence from a carried
    state (used for streaming); ``return_last_state`` also returns the final state.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    fused = mamba_ssm_scan() if u.is_cuda and initial_state is None else None
    if fused is not None:
        return fused(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u32, delta, A32, B32, C32 = (t.to(compute) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h0 = (u32.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None
          else initial_state.to(compute))
    if u.device.type == "cpu":
        y, h_last = _CPUScan.apply(u32, delta, A32, B32, C32, h0)
    else:
        y, h_last = chunked_scan(u32, delta, A32, B32, C32, h0)
    if D is not None:
        y = y + u32 * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, h_last.to(out_dtype)) if return_last_state else y
