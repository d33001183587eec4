"""The selective scan's Triton kernels, forward and backward (the design is described in
:mod:`matten.ssm.triton_scan`, which launches them)."""

from __future__ import annotations

import triton
import triton.language as tl

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
def _load_coeff(
    ptr, offs_n, t, mask_n, mask_t, stride_n, stride_l, VARIES: tl.constexpr, COMPUTE: tl.constexpr
):
    """A channel's B or C over one chunk: (N, BLOCK_L), or (N, 1) when constant in time."""
    if VARIES:
        x = tl.load(
            ptr + offs_n[:, None] * stride_n + t[None, :] * stride_l,
            mask=mask_n[:, None] & mask_t[None, :],
            other=0.0,
        ).to(COMPUTE)
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
def scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h0_ptr,
    out_ptr,
    h_last_ptr,
    h_chunks_ptr,
    dim,
    length,
    nstate,
    per_gB,
    per_gC,
    su_b,
    su_d,
    su_l,
    sdt_b,
    sdt_d,
    sdt_l,
    sz_b,
    sz_d,
    sz_l,
    sA_d,
    sA_n,
    sB_b,
    sB_g,
    sB_n,
    sB_l,
    sC_b,
    sC_g,
    sC_n,
    sC_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr,
    SAVE_CHUNKS: tl.constexpr,
    B_VARIES: tl.constexpr,
    C_VARIES: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
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
def scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    h_chunks_ptr,
    dout_ptr,
    dh_last_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dh0_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    dbias_ptr,
    dim,
    length,
    nstate,
    per_gB,
    per_gC,
    su_b,
    su_d,
    su_l,
    sdt_b,
    sdt_d,
    sdt_l,
    sz_b,
    sz_d,
    sz_l,
    sA_d,
    sA_n,
    sB_b,
    sB_g,
    sB_n,
    sB_l,
    sC_b,
    sC_g,
    sC_n,
    sC_l,
    so_b,
    so_d,
    so_l,
    sdB_b,
    sdB_g,
    sdB_n,
    sdB_l,
    sdC_b,
    sdC_g,
    sdC_n,
    sdC_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_DH_LAST: tl.constexpr,
    B_VARIES: tl.constexpr,
    C_VARIES: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
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
        h_start = tl.load(
            h_chunks_ptr + (pid * n_chunks + c) * nstate + offs_n, mask=mask_n, other=0.0
        )
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
            tl.store(
                dz_ptr + pid * length + t,
                (dout * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                mask=mask_t,
            )
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
        g_cum, g_local = tl.associative_scan(
            (a_next, Ct * dy[None, :]), axis=1, combine_fn=_combine, reverse=True
        )
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
            tl.atomic_add(
                dB_row + offs_n[:, None] * sdB_n + t[None, :] * sdB_l,
                dB_tile,
                mask=mask_n[:, None] & mask_t[None, :],
            )
        else:
            dB_const += tl.sum(dB_tile, axis=1)
        if C_VARIES:
            tl.atomic_add(
                dC_row + offs_n[:, None] * sdC_n + t[None, :] * sdC_l,
                dC_tile,
                mask=mask_n[:, None] & mask_t[None, :],
            )
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
