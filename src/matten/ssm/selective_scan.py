"""``selective_scan``: Mamba's S6 scan with the call signature of ``mamba_ssm``'s ``selective_scan_fn``.

Dispatch, by device:
  * CUDA with ``mamba_ssm`` importable -> its fused kernel (unless an initial state is given,
    which that kernel does not take);
  * CUDA otherwise (or any non-CPU device) -> :func:`matten.ssm.chunked_scan.chunked_scan`;
  * CPU (and the meta device) -> the compiled kernels of :mod:`matten.ssm.cpu_kernel`, with a
    hand-written backward, registered as the operators ``matten::scan_fwd`` / ``matten::scan_bwd``.

Discretisation follows Mamba: A_bar = exp(delta * A) (zero-order hold) and B_bar * u = delta * B * u
(the first-order simplification of the paper's Eq. 3 that Mamba's kernels use).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

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


# The CPU kernels are registered as PyTorch operators so that autograd, the meta device (shape
# inference, parameter and FLOP counting without memory) and FlopCounterMode all see them.
@torch.library.custom_op("matten::scan_fwd", mutates_args=(), device_types="cpu")
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
              h0: Tensor) -> tuple[Tensor, Tensor]:
    return cpu_kernel.scan_forward(u, delta, A, B, C, h0)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, h0):
    return torch.empty_like(u), torch.empty_like(h0)


@torch.library.custom_op("matten::scan_bwd", mutates_args=(), device_types="cpu")
def _scan_bwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor, dy: Tensor,
              dh_last: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return cpu_kernel.scan_backward(u, delta, A, B, C, h0, dy, dh_last)


@_scan_bwd.register_fake
def _(u, delta, A, B, C, h0, dy, dh_last):
    return tuple(torch.empty_like(t) for t in (u, delta, A, B, C, h0))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy, dh_last):
    u, delta, A, B, C, h0 = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy.contiguous()
    dh_last = torch.zeros_like(h0) if dh_last is None else dh_last.contiguous()
    return _scan_bwd(u, delta, A, B, C, h0, dy, dh_last)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def scan_flops(batch: int, dim: int, length: int, nstate: int) -> int:
    """FLOPs of the bare recurrence: three multiply-adds per state element and step
    (A_bar * h, B_bar * u, C * h), the terms of the paper's Eq. 7 that grow with N."""
    return 2 * 3 * batch * dim * length * nstate


@register_flop_formula(torch.ops.matten.scan_fwd)
def _scan_fwd_flops(u_shape, *args, **kwargs) -> int:
    batch, dim, length = u_shape
    return scan_flops(batch, dim, length, args[1][1])


@register_flop_formula(torch.ops.matten.scan_bwd)
def _scan_bwd_flops(u_shape, *args, **kwargs) -> int:
    batch, dim, length = u_shape
    return 2 * scan_flops(batch, dim, length, args[1][1])


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
    u32, delta, A32, B32, C32 = (t.to(compute).contiguous() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h0 = (u32.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if initial_state is None
          else initial_state.to(compute))
    if u.device.type in ("cpu", "meta"):
        y, h_last = _scan_fwd(u32, delta.contiguous(), A32, B32, C32, h0.contiguous())
    else:
        y, h_last = chunked_scan(u32, delta, A32, B32, C32, h0)
    if D is not None:
        y = y + u32 * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, h_last.to(out_dtype)) if return_last_state else y
