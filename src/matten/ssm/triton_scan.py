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

# -- small device functions ------------------------------------------------------------------------

@triton.jit
def _combine(a_first, b_first, a_then, b_then):
    """Two steps of h -> a h + b, the first applied first:
    h -> a_then (a_first h + b_first) + b_then. A reverse scan hands the later steps' accumulation
    as the first pair, so the same function composes the adjoint recurrence too."""
    return a_first * a_then, a_then * b_first + b_then


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x: the rounding error of w = 1 + x cancels in log(w) / (w - 1).
    w = 1.0 + x
    return tl.where(w == 1.0, x, tl.log(w) * (x / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _softplus(x):
    # log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), which never overflows.
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _load_delta(row, t, mask, stride, bias, SOFTPLUS: tl.constexpr, COMPUTE: tl.constexpr):
    """(delta + bias before softplus, the delta the recurrence uses); the latter is 0 outside the
    sequence, so that padding steps keep the state (decay exp(0) = 1, no input)."""
    pre = tl.load(row + t * stride, mask=mask, other=0.0).to(COMPUTE) + bias
    dt = _softplus(pre) if SOFTPLUS else pre
    return pre, tl.where(mask, dt, 0.0)


@triton.jit
def _load_coeff(ptr, offs_n, t, mask_n, mask_t, stride_n, stride_l, VARIES: tl.constexpr,
                COMPUTE: tl.constexpr):
    """A channel's B or C over one chunk: (N, BLOCK_L), or (N, 1) when constant in time."""
    if VARIES:
        x = tl.load(ptr + offs_n[:, None] * stride_n + t[None, :] * stride_l,
                    mask=mask_n[:, None] & mask_t[None, :], other=0.0).to(COMPUTE)
    else:
        x = tl.load(ptr + offs_n * stride_n, mask=mask_n, other=0.0).to(COMPUTE)[:, None]
    return x


@triton.jit
def _column(x, offs_l, index):
    """Column ``index`` of an (N, BLOCK_L) tile, as an (N,) vector."""
    return tl.sum(tl.where(offs_l[None, :] == index, x, 0.0), axis=1)


@triton.jit
def _chunk_states(h_start, dt, u, A, Bt):
    """States h_t (N, BLOCK_L) of one chunk from its start state, and the decays a_t and inputs
    b_t = delta_t B_t u_t that produced them."""
    a = tl.exp(dt[None, :] * A[:, None])
    b = Bt * (dt * u)[None, :]
    a_cum, h_local = tl.associative_scan((a, b), axis=1, combine_fn=_combine)
    return a_cum * h_start[:, None] + h_local, a, b


# -- forward ---------------------------------------------------------------------------------------

@triton.jit
def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
        out_ptr, h_last_ptr, h_chunks_ptr,
        dim, length, nstate, per_gB, per_gC,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, SAVE_CHUNKS: tl.constexpr,
        B_VARIES: tl.constexpr, C_VARIES: tl.constexpr, COMPUTE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch * dim * L may pass 2^31
    b, d = pid // dim, pid % dim
    offs_n, offs_l = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_L)
    mask_n = offs_n < nstate
    # Padded states (n >= N) have A = 0, B = C = 0: decay 1, no input, no output.
    A = tl.load(A_ptr + d * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(COMPUTE)
    bias = tl.load(bias_ptr + d).to(COMPUTE) if HAS_BIAS else 0.0
    D = tl.load(D_ptr + d).to(COMPUTE) if HAS_D else 0.0
    u_row, dt_row = u_ptr + b * su_b + d * su_d, delta_ptr + b * sdt_b + d * sdt_d
    z_row, out_row = z_ptr + b * sz_b + d * sz_d, out_ptr + pid * length
    B_row = B_ptr + b * sB_b + (d // per_gB) * sB_g
    C_row = C_ptr + b * sC_b + (d // per_gC) * sC_g
    if HAS_H0:
        h = tl.load(h0_ptr + pid * nstate + offs_n, mask=mask_n, other=0.0).to(COMPUTE)
    else:
        h = tl.zeros([BLOCK_N], dtype=COMPUTE)

    n_chunks = tl.cdiv(length, BLOCK_L)
    for c in range(0, n_chunks):
        if SAVE_CHUNKS:  # the backward restarts each chunk from here
            tl.store(h_chunks_ptr + (pid * n_chunks + c) * nstate + offs_n, h, mask=mask_n)
        t = c * BLOCK_L + offs_l
        mask_t = t < length
        u = tl.load(u_row + t * su_l, mask=mask_t, other=0.0).to(COMPUTE)
        _, dt = _load_delta(dt_row, t, mask_t, sdt_l, bias, SOFTPLUS, COMPUTE)
        Bt = _load_coeff(B_row, offs_n, t, mask_n, mask_t, sB_n, sB_l, B_VARIES, COMPUTE)
        Ct = _load_coeff(C_row, offs_n, t, mask_n, mask_t, sC_n, sC_l, C_VARIES, COMPUTE)
        hs, _, _ = _chunk_states(h, dt, u, A, Bt)
        # Padding steps keep the state, so the last column is the state after the chunk.
        h = _column(hs, offs_l, BLOCK_L - 1)
        y = tl.sum(hs * Ct, axis=0)
        if HAS_D:
            y += D * u
        if HAS_Z:
            z = tl.load(z_row + t * sz_l, mask=mask_t, other=0.0).to(COMPUTE)
            y *= z * tl.sigmoid(z)
        tl.store(out_row + t, y.to(out_ptr.dtype.element_ty), mask=mask_t)
    tl.store(h_last_ptr + pid * nstate + offs_n, h, mask=mask_n)


# -- backward --------------------------------------------------------------------------------------

@triton.jit
def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h_chunks_ptr,
        dout_ptr, dh_last_ptr,
        du_ptr, ddelta_ptr, dz_ptr, dh0_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        dim, length, nstate, per_gB, per_gC,
        su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sA_d, sA_n,
        sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, so_b, so_d, so_l,
        sdB_b, sdB_g, sdB_n, sdB_l, sdC_b, sdC_g, sdC_n, sdC_l,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, HAS_DH_LAST: tl.constexpr,
        B_VARIES: tl.constexpr, C_VARIES: tl.constexpr, COMPUTE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, d = pid // dim, pid % dim
    offs_n, offs_l = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_L)
    mask_n = offs_n < nstate
    A = tl.load(A_ptr + d * sA_d + offs_n * sA_n, mask=mask_n, other=0.0).to(COMPUTE)
    bias = tl.load(bias_ptr + d).to(COMPUTE) if HAS_BIAS else 0.0
    D = tl.load(D_ptr + d).to(COMPUTE) if HAS_D else 0.0
    u_row, dt_row = u_ptr + b * su_b + d * su_d, delta_ptr + b * sdt_b + d * sdt_d
    z_row, dout_row = z_ptr + b * sz_b + d * sz_d, dout_ptr + b * so_b + d * so_d
    B_row = B_ptr + b * sB_b + (d // per_gB) * sB_g
    C_row = C_ptr + b * sC_b + (d // per_gC) * sC_g
    dB_row = dB_ptr + b * sdB_b + (d // per_gB) * sdB_g
    dC_row = dC_ptr + b * sdC_b + (d // per_gC) * sdC_g

    # g_next: dLoss/dh at the first step of the chunk after the current one. Past the end of the
    # sequence that is the gradient of the returned last state (padding steps pass it through).
    if HAS_DH_LAST:
        g_next = tl.load(dh_last_ptr + pid * nstate + offs_n, mask=mask_n, other=0.0).to(COMPUTE)
    else:
        g_next = tl.zeros([BLOCK_N], dtype=COMPUTE)
    dA = tl.zeros([BLOCK_N], dtype=COMPUTE)
    dB_const = tl.zeros([BLOCK_N], dtype=COMPUTE)  # used for a B/C constant in time
    dC_const = tl.zeros([BLOCK_N], dtype=COMPUTE)
    dD = tl.zeros([BLOCK_L], dtype=COMPUTE)  # per step, summed at the end
    dbias = tl.zeros([BLOCK_L], dtype=COMPUTE)

    n_chunks = tl.cdiv(length, BLOCK_L)
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * BLOCK_L + offs_l
        mask_t = t < length
        h_start = tl.load(h_chunks_ptr + (pid * n_chunks + c) * nstate + offs_n, mask=mask_n,
                          other=0.0)
        u = tl.load(u_row + t * su_l, mask=mask_t, other=0.0).to(COMPUTE)
        dt_pre, dt = _load_delta(dt_row, t, mask_t, sdt_l, bias, SOFTPLUS, COMPUTE)
        Bt = _load_coeff(B_row, offs_n, t, mask_n, mask_t, sB_n, sB_l, B_VARIES, COMPUTE)
        Ct = _load_coeff(C_row, offs_n, t, mask_n, mask_t, sC_n, sC_l, C_VARIES, COMPUTE)
        hs, _, bx = _chunk_states(h_start, dt, u, A, Bt)
        dout = tl.load(dout_row + t * so_l, mask=mask_t, other=0.0).to(COMPUTE)

        # Output side: out = (<C_t, h_t> + D u_t) * silu(z_t).
        if HAS_Z:
            z = tl.load(z_row + t * sz_l, mask=mask_t, other=0.0).to(COMPUTE)
            sig = tl.sigmoid(z)
            y = tl.sum(hs * Ct, axis=0) + D * u
            tl.store(dz_ptr + pid * length + t,
                     (dout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                     mask=mask_t)
            dy = dout * z * sig
        else:
            dy = dout
        du = dy * D
        if HAS_D:
            dD += dy * u

        # Adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, a reverse scan with the next step's decay
        # (1 past the end of the sequence, where g is the last state's gradient).
        _, dt_next = _load_delta(dt_row, t + 1, t + 1 < length, sdt_l, bias, SOFTPLUS, COMPUTE)
        a_next = tl.exp(dt_next[None, :] * A[:, None])
        g_cum, g_local = tl.associative_scan((a_next, Ct * dy[None, :]), axis=1,
                                             combine_fn=_combine, reverse=True)
        gs = g_cum * g_next[:, None] + g_local

        # h_t = a_t h_{t-1} + b_t, so a_t h_{t-1} = h_t - b_t: no shifted states needed.
        g_decay = gs * (hs - bx)  # dLoss/d(a_t) * a_t
        gB = tl.sum(gs * Bt, axis=0)  # dLoss/d(delta_t u_t)
        du += gB * dt
        ddt = tl.sum(g_decay * A[:, None], axis=0) + gB * u
        dA += tl.sum(g_decay * dt[None, :], axis=1)
        dB_tile = gs * (dt * u)[None, :]
        dC_tile = hs * dy[None, :]
        if B_VARIES:  # channels of a group add into the same (N, L) entries
            tl.atomic_add(dB_row + offs_n[:, None] * sdB_n + t[None, :] * sdB_l, dB_tile,
                          mask=mask_n[:, None] & mask_t[None, :])
        else:
            dB_const += tl.sum(dB_tile, axis=1)
        if C_VARIES:
            tl.atomic_add(dC_row + offs_n[:, None] * sdC_n + t[None, :] * sdC_l, dC_tile,
                          mask=mask_n[:, None] & mask_t[None, :])
        else:
            dC_const += tl.sum(dC_tile, axis=1)
        if SOFTPLUS:
            ddt *= tl.sigmoid(dt_pre)
        ddt = tl.where(mask_t, ddt, 0.0)
        dbias += ddt
        tl.store(du_ptr + pid * length + t, du.to(du_ptr.dtype.element_ty), mask=mask_t)
        tl.store(ddelta_ptr + pid * length + t, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_t)
        g_next = _column(gs, offs_l, 0)

    # dLoss/dh_{-1} = a_0 g_0, a_0 the first step's decay; per-channel parameters get one row
    # per (batch, channel).
    _, dt_first = _load_delta(dt_row, offs_l, offs_l < length, sdt_l, bias, SOFTPLUS, COMPUTE)
    dt0 = tl.sum(tl.where(offs_l == 0, dt_first, 0.0), axis=0)
    tl.store(dh0_ptr + pid * nstate + offs_n, tl.exp(dt0 * A) * g_next, mask=mask_n)
    tl.store(dA_ptr + pid * nstate + offs_n, dA, mask=mask_n)
    if not B_VARIES:
        tl.store(dB_ptr + pid * nstate + offs_n, dB_const, mask=mask_n)
    if not C_VARIES:
        tl.store(dC_ptr + pid * nstate + offs_n, dC_const, mask=mask_n)
    if HAS_D:
        tl.store(dD_ptr + pid, tl.sum(dD, axis=0))
    if HAS_BIAS:
        tl.store(dbias_ptr + pid, tl.sum(dbias, axis=0))


# -- host side -------------------------------------------------------------------------------------

def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


#: True when the kernels above run through Triton's interpreter (decided when they were defined).
INTERPRETED = _interpreted(_scan_fwd_kernel)


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
        h_chunks = (torch.empty(batch, dim, n_chunks, nstate, device=u.device, dtype=acc)
                    if save else h_last)
        _scan_fwd_kernel[(batch * dim,)](
            u, delta, A, B4, C4, _dummy(D, u), _dummy(z, u), _dummy(delta_bias, u),
            _dummy(initial_state, u), out, h_last, h_chunks,
            dim, length, nstate, layouts.channels_per_group(B4, dim),
            layouts.channels_per_group(C4, dim),
            *u.stride(), *delta.stride(), *_strides(z), *A.stride(),
            *_bc_args(B4), *_bc_args(C4),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus, HAS_H0=initial_state is not None, SAVE_CHUNKS=save,
            B_VARIES=B.dim() > 2, C_VARIES=C.dim() > 2, COMPUTE=acc_tl,
            BLOCK_N=block_n, BLOCK_L=block_l, num_warps=4)
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
        dB4 = (torch.zeros(B4.shape, device=u.device, dtype=acc) if B.dim() > 2
               else new(batch, dim, nstate))
        dC4 = (torch.zeros(C4.shape, device=u.device, dtype=acc) if C.dim() > 2
               else new(batch, dim, nstate))
        _scan_bwd_kernel[(batch * dim,)](
            u, delta, A, B4, C4, _dummy(D, u), _dummy(z, u), _dummy(delta_bias, u), h_chunks,
            dout, _dummy(dh_last, u),
            du, ddelta, dz, dh0, dA, dB4, dC4, dD, dbias,
            dim, length, nstate, layouts.channels_per_group(B4, dim),
            layouts.channels_per_group(C4, dim),
            *u.stride(), *delta.stride(), *_strides(z), *A.stride(),
            *_bc_args(B4), *_bc_args(C4), *dout.stride(),
            *(dB4.stride() if B.dim() > 2 else (0, 0, 0, 0)),
            *(dC4.stride() if C.dim() > 2 else (0, 0, 0, 0)),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.softplus, HAS_DH_LAST=dh_last is not None,
            B_VARIES=B.dim() > 2, C_VARIES=C.dim() > 2, COMPUTE=acc_tl,
            BLOCK_N=block_n, BLOCK_L=block_l, num_warps=8)  # about twice the live tiles

        def per_channel(grad, like):  # (batch, dim, ...) rows summed over the batch
            return None if like is None else grad.sum(0).to(like.dtype)

        def bc_grad(grad4, like):
            grad = grad4.sum(0) if like.dim() == 2 else grad4  # constant: (batch, dim, N) rows
            return grad.reshape(like.shape).to(like.dtype)

        return (du, ddelta, per_channel(dA, A), bc_grad(dB4, B), bc_grad(dC4, C),
                per_channel(dD, D), dz if z is not None else None, per_channel(dbias, delta_bias),
                dh0.to(initial_state.dtype) if initial_state is not None else None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, initial_state=None, chunk: int | None = None):
    """The fused scan: (out in u's dtype, last state in float32 or float64).

    Same arguments and layouts as :func:`matten.ssm.selective_scan` (checked there); ``chunk``
    (a power of two) overrides the number of steps per chunk.
    """
    return _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, initial_state,
                             bool(delta_softplus), chunk)
