"""Fast CPU selective scan: a compiled (numba) loop over time, one channel at a time.

Each (batch, channel) pair owns an N-vector state that stays in cache, so the discretised
(batch, dim, L, N) tensors are never built. The backward kernel re-runs the forward recurrence of
one channel into private (L, N) buffers (states and decays) and then walks back through time; peak
extra memory is threads x 2 x L x N values, not batch x dim x L x N. Channels are split across
threads with ``prange``; the gradients of B and C, which sum over channels, go to one partial
buffer per thread and are summed afterwards (extra memory: threads x the size of B and C).

B and C come in any of ``mamba_ssm``'s layouts (:mod:`matten.ssm.layouts`) and reach the kernels
time-major, as (batch or 1, G, L or 1, N), so that the inner loop over the N states reads
contiguous memory. A size-1 batch or time axis is read at index 0 (its step is 0), and channel d
reads group d // (dim // G): one kernel serves the variable, grouped and constant layouts.

Most of the time goes into exp(delta * A): L x dim x N of them. In float32 they use
:func:`decay`, an exp that LLVM can vectorise over the N states (libm's expf cannot be); float64
keeps math.exp.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload

from . import layouts

# Reassociation and contraction (FMA) help vectorise the loops over N; no-NaN/no-inf
# assumptions are left out so that bad values still propagate.
_JIT = dict(nopython=True, nogil=True, cache=True, parallel=True,
            fastmath={"nsz", "arcp", "contract", "reassoc"})


def decay(x):
    """exp(x); compiled kernels get the type-specific version below."""
    return math.exp(x)


@overload(decay, inline="always", fastmath=_JIT["fastmath"])
def _decay_impl(x):
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return lambda x: math.exp(x)

    def exp_float32(x):
        # exp(x) = 2^k * exp(r), |r| <= ln2 / 2: Taylor to r^6 (relative error < 3e-7), and 2^k
        # written straight into the float's exponent bits. Clamped to float32's normal range.
        x = min(max(x, np.float32(-87.0)), np.float32(88.0))
        k = math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
        r = x - k * np.float32(0.693145751953125) - k * np.float32(1.428606765330187e-06)
        p = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(0.5) + r * (
            np.float32(1 / 6) + r * (np.float32(1 / 24) + r * (np.float32(1 / 120)
                                                              + r * np.float32(1 / 720))))))
        return p * np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)

    return exp_float32


@numba.jit(**_JIT)
def _scan_forward(u, delta, A, Bt, Ct, h0, y, h_last):
    batch, dim, length = u.shape
    nstate = A.shape[1]
    # Index steps that are 0 along a broadcast (size-1) batch or time axis of B and C.
    bB, tB, bC, tC = Bt.shape[0] > 1, Bt.shape[2] > 1, Ct.shape[0] > 1, Ct.shape[2] > 1
    per_gB, per_gC = dim // Bt.shape[1], dim // Ct.shape[1]
    for bd in numba.prange(batch * dim):
        b = bd // dim
        d = bd % dim
        B_bd = Bt[b * bB, d // per_gB]  # (L or 1, N): this channel's B
        C_bd = Ct[b * bC, d // per_gC]
        h = h0[b, d].copy()
        decays = np.empty(nstate, dtype=u.dtype)
        a = A[d]
        for t in range(length):
            dt = delta[b, d, t]
            dtu = dt * u[b, d, t]
            for n in range(nstate):
                decays[n] = decay(dt * a[n])
            acc = u.dtype.type(0.0)
            for n in range(nstate):
                h[n] = decays[n] * h[n] + dtu * B_bd[t * tB, n]
                acc += h[n] * C_bd[t * tC, n]
            y[b, d, t] = acc
        h_last[b, d] = h


@numba.jit(**_JIT)
def _scan_backward(u, delta, A, Bt, Ct, h0, dy, dh_last, du, ddelta, dA_part, dB_part, dC_part, dh0):
    batch, dim, length = u.shape
    nstate = A.shape[1]
    bB, tB, bC, tC = Bt.shape[0] > 1, Bt.shape[2] > 1, Ct.shape[0] > 1, Ct.shape[2] > 1
    per_gB, per_gC = dim // Bt.shape[1], dim // Ct.shape[1]
    groups = dB_part.shape[0]
    total = batch * dim
    per_group = (total + groups - 1) // groups
    for g in numba.prange(groups):
        # states[t + 1] is h_t; states[0] is the initial state.
        states = np.empty((length + 1, nstate), dtype=u.dtype)
        decays = np.empty((length, nstate), dtype=u.dtype)
        gh = np.empty(nstate, dtype=u.dtype)
        for bd in range(g * per_group, min(total, (g + 1) * per_group)):
            b = bd // dim
            d = bd % dim
            B_bd, dB_bd = Bt[b * bB, d // per_gB], dB_part[g, b * bB, d // per_gB]
            C_bd, dC_bd = Ct[b * bC, d // per_gC], dC_part[g, b * bC, d // per_gC]
            a = A[d]
            states[0] = h0[b, d]
            for t in range(length):
                dt = delta[b, d, t]
                dtu = dt * u[b, d, t]
                for n in range(nstate):
                    decays[t, n] = decay(dt * a[n])
                for n in range(nstate):
                    states[t + 1, n] = decays[t, n] * states[t, n] + dtu * B_bd[t * tB, n]
            # Backward through time; gh holds dLoss/dh_t.
            gh[:] = dh_last[b, d]
            for t in range(length - 1, -1, -1):
                dt = delta[b, d, t]
                ut = u[b, d, t]
                g_y = dy[b, d, t]
                gu = u.dtype.type(0.0)
                gdt = u.dtype.type(0.0)
                for n in range(nstate):
                    dC_bd[t * tC, n] += g_y * states[t + 1, n]
                    gh[n] += g_y * C_bd[t * tC, n]
                    gu += gh[n] * B_bd[t * tB, n]
                    dB_bd[t * tB, n] += gh[n] * dt * ut
                    g_decay = gh[n] * states[t, n] * decays[t, n]
                    gdt += g_decay * a[n]
                    dA_part[b, d, n] += g_decay * dt
                    gh[n] *= decays[t, n]
                du[b, d, t] = gu * dt
                ddelta[b, d, t] = gdt + gu * ut
            dh0[b, d] = gh


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _time_major(X: torch.Tensor) -> np.ndarray:
    """B or C in any layout -> contiguous (batch or 1, G, L or 1, N)."""
    return _np(layouts.as_grouped(X).transpose(2, 3))


def scan_forward(u, delta, A, B, C, h0):
    """y (batch, dim, L) and the last state (batch, dim, N) of the bare recurrence (no D, no z)."""
    y = torch.empty_like(u)
    h_last = torch.empty_like(h0)
    _scan_forward(_np(u), _np(delta), _np(A), _time_major(B), _time_major(C), _np(h0),
                  y.numpy(), h_last.numpy())
    return y, h_last


def _partials(X, groups, dtype):
    """One zeroed time-major gradient buffer of B or C per thread group."""
    X4 = layouts.as_grouped(X)
    return torch.zeros(groups, X4.shape[0], X4.shape[1], X4.shape[3], X4.shape[2], dtype=dtype)


def _summed(part, like):
    """Sum of the per-thread partials, back in the layout of ``like``."""
    return part.sum(0).transpose(2, 3).reshape(like.shape)


def scan_backward(u, delta, A, B, C, h0, dy, dh_last):
    """Gradients of the bare recurrence with respect to u, delta, A, B, C and the initial state."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    groups = max(1, min(numba.get_num_threads(), batch * dim))
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA_part = torch.zeros(batch, dim, nstate, dtype=u.dtype)
    dB_part, dC_part = _partials(B, groups, u.dtype), _partials(C, groups, u.dtype)
    dh0 = torch.empty_like(h0)
    _scan_backward(_np(u), _np(delta), _np(A), _time_major(B), _time_major(C), _np(h0), _np(dy),
                   _np(dh_last), du.numpy(), ddelta.numpy(), dA_part.numpy(), dB_part.numpy(),
                   dC_part.numpy(), dh0.numpy())
    return du, ddelta, dA_part.sum(0), _summed(dB_part, B), _summed(dC_part, C), dh0
