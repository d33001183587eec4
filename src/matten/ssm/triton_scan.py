"""The selective scan as Triton kernels: forward and backward, the state kept on chip.

One program runs one (batch, channel) pair through the whole sequence, as ``mamba_ssm``'s CUDA
kernel does. It walks the sequence in chunks of ``BLOCK_L`` steps; within a chunk it holds an
(N, BLOCK_L) tile of discretised coefficients in registers and solves the recurrence
h_t = a_t h_{t-1} + b_t with a parallel scan along time (``tl.associative_scan`` on the pairs
(a_t, b_t)), then carries the chunk's last state into the next chunk. Nothing of size
(batch, dim, L, N) is ever written to memory.

The forward saves only the state at the start of every chunk (batch, dim, L / BLOCK_L, N). The
backward walks the chunks in reverse: it recomputes the chunk's states from the saved one, then
runs the adjoint recurrence g_t = dLoss/dh_t = C_t dy_t + a_{t+1} g_{t+1} as a reverse scan,
carrying g from chunk to chunk. Everything is fused: delta_bias and softplus on the way in, D and
the silu(z) gate on the way out, and their gradients on the way back. All arithmetic is float32
(float64 for float64 inputs), whatever the input dtype.

Gradients that sum over channels (dB and dC of a variable or grouped B/C) are accumulated with
atomic adds into a float32 buffer, as ``mamba_ssm`` does; gradients of per-channel parameters
(A, D, delta_bias, a constant B/C) are written per (batch, channel) and summed over the batch by
torch, so they are deterministic.

B and C are read through the strided (batch or 1, G, N, L or 1) view of
:func:`matten.ssm.layouts.as_grouped` with stride 0 along broadcast axes, so the variable,
grouped and constant layouts share one kernel and none is expanded in memory.

Triton compiles the kernels for CUDA tensors. With ``TRITON_INTERPRET=1`` set before triton is
first imported (importing torch's FLOP counter, and so matten, imports it), Triton's interpreter
runs them on CPU tensors instead (slowly, for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from . import layouts
from .triton_kernels import scan_bwd_kernel, scan_fwd_kernel


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


#: True when the kernels above run through Triton's interpreter (decided when they were defined).
INTERPRETED = _interpreted(scan_fwd_kernel)


def runs_on(device: torch.device) -> bool:
    """Whether these kernels can run tensors of ``device`` in this process."""
    if INTERPRETED:
        # Triton's own library (tl.sum, tl.cdiv, ...) must be interpreted too, which it is when
        # triton was first imported with TRITON_INTERPRET=1; launches want the variable still set.
        return device.type == "cpu" and _interpreted(tl.cdiv) and bool(knobs.runtime.interpret)
    return device.type == "cuda" and torch.cuda.is_available()


def _block_sizes(nstate: int, length: int, chunk: int | None) -> tuple[int, int]:
    block_n = max(2, triton.next_power_of_2(nstate))
    if chunk is None:  # about 2048 tile elements: a few dozen registers per thread and tile
        chunk = min(max(16, 2048 // block_n), max(16, triton.next_power_of_2(length)))
    if chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    return block_n, chunk


def _compute_dtype(u: torch.Tensor):
    return (torch.float64, tl.float64) if u.dtype == torch.float64 else (torch.float32, tl.float32)


def _bc_args(X4: torch.Tensor) -> list[int]:
    """Strides (batch, group, state, time) of a grouped view; 0 along its broadcast axes."""
    sb, sg, sn, sl = X4.stride()
    return [0 if X4.shape[0] == 1 else sb, sg, sn, 0 if X4.shape[3] == 1 else sl]


def _strides(z: torch.Tensor | None) -> tuple[int, ...]:
    return z.stride() if z is not None else (0, 0, 0)


def _dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # A pointer the kernel never reads (its HAS_* flag is off).
    return like if t is None else t


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, chunk):
        batch, dim, length = u.shape
        nstate = A.shape[1]
        block_n, block_l = _block_sizes(nstate, length, chunk)
        acc, acc_tl = _compute_dtype(u)
        B4, C4 = layouts.as_grouped(B), layouts.as_grouped(C)
        save = any(ctx.needs_input_grad)  # a backward will follow: keep the chunk states
        n_chunks = triton.cdiv(length, block_l)
        out = torch.empty(batch, dim, length, device=u.device, dtype=u.dtype)
        h_last = torch.empty(batch, dim, nstate, device=u.device, dtype=acc)
        h_chunks = (
            torch.empty(batch, dim, n_chunks, nstate, device=u.device, dtype=acc)
            if save
            else h_last
        )
        scan_fwd_kernel[(batch * dim,)](
            u,
            delta,
            A,
            B4,
            C4,
            _dummy(D, u),
            _dummy(z, u),
            _dummy(delta_bias, u),
            _dummy(initial_state, u),
            out,
            h_last,
            h_chunks,
            dim,
            length,
            nstate,
            layouts.channels_per_group(B4, dim),
            layouts.channels_per_group(C4, dim),
            *u.stride(),
            *delta.stride(),
            *_strides(z),
            *A.stride(),
            *_bc_args(B4),
            *_bc_args(C4),
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus,
            HAS_H0=initial_state is not None,
            SAVE_CHUNKS=save,
            B_VARIES=B.dim() > 2,
            C_VARIES=C.dim() > 2,
            COMPUTE=acc_tl,
            BLOCK_N=block_n,
            BLOCK_L=block_l,
            num_warps=4,
        )
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, h_chunks)
            ctx.softplus, ctx.blocks = softplus, (block_n, block_l)
        return out, h_last

    @staticmethod
    def backward(ctx, dout, dh_last):
        u, delta, A, B, C, D, z, delta_bias, initial_state, h_chunks = ctx.saved_tensors
        batch, dim, length = u.shape
        nstate = A.shape[1]
        block_n, block_l = ctx.blocks
        acc, acc_tl = _compute_dtype(u)
        B4, C4 = layouts.as_grouped(B), layouts.as_grouped(C)
        if dout is None:
            dout = torch.zeros(1, 1, 1, device=u.device, dtype=u.dtype).expand(u.shape)

        def new(*shape, dtype=acc):
            return torch.empty(*shape, device=u.device, dtype=dtype)

        du, ddelta = new(*u.shape, dtype=u.dtype), new(*u.shape, dtype=delta.dtype)
        dz = new(*u.shape, dtype=z.dtype) if z is not None else du
        dh0 = new(batch, dim, nstate)
        dA = new(batch, dim, nstate)
        dD, dbias = new(batch, dim), new(batch, dim)
        # Variable B/C: atomics into a zeroed (batch, G, N, L) buffer; constant: one row per
        # (batch, channel), summed below.
        dB4 = (
            torch.zeros(B4.shape, device=u.device, dtype=acc)
            if B.dim() > 2
            else new(batch, dim, nstate)
        )
        dC4 = (
            torch.zeros(C4.shape, device=u.device, dtype=acc)
            if C.dim() > 2
            else new(batch, dim, nstate)
        )
        scan_bwd_kernel[(batch * dim,)](
            u,
            delta,
            A,
            B4,
            C4,
            _dummy(D, u),
            _dummy(z, u),
            _dummy(delta_bias, u),
            h_chunks,
            dout,
            _dummy(dh_last, u),
            du,
            ddelta,
            dz,
            dh0,
            dA,
            dB4,
            dC4,
            dD,
            dbias,
            dim,
            length,
            nstate,
            layouts.channels_per_group(B4, dim),
            layouts.channels_per_group(C4, dim),
            *u.stride(),
            *delta.stride(),
            *_strides(z),
            *A.stride(),
            *_bc_args(B4),
            *_bc_args(C4),
            *dout.stride(),
            *(dB4.stride() if B.dim() > 2 else (0, 0, 0, 0)),
            *(dC4.stride() if C.dim() > 2 else (0, 0, 0, 0)),
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.softplus,
            HAS_DH_LAST=dh_last is not None,
            B_VARIES=B.dim() > 2,
            C_VARIES=C.dim() > 2,
            COMPUTE=acc_tl,
            BLOCK_N=block_n,
            BLOCK_L=block_l,
            num_warps=8,
        )  # about twice the live tiles

        def per_channel(grad, like):  # (batch, dim, ...) rows summed over the batch
            return None if like is None else grad.sum(0).to(like.dtype)

        def bc_grad(grad4, like):
            grad = grad4.sum(0) if like.dim() == 2 else grad4  # constant: (batch, dim, N) rows
            return grad.reshape(like.shape).to(like.dtype)

        return (
            du,
            ddelta,
            per_channel(dA, A),
            bc_grad(dB4, B),
            bc_grad(dC4, C),
            per_channel(dD, D),
            dz if z is not None else None,
            per_channel(dbias, delta_bias),
            dh0.to(initial_state.dtype) if initial_state is not None else None,
            None,
            None,
        )


def selective_scan_triton(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    chunk: int | None = None,
):
    """The fused scan: (out in u's dtype, last state in float32 or float64).

    Same arguments and layouts as :func:`matten.ssm.selective_scan` (checked there); ``chunk``
    (a power of two) overrides the number of steps per chunk.
    """
    return _TritonScan.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), chunk
    )
