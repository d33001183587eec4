"""Fast CPU selective scan: a compiled (numba) loop over time, one channel at a time.

Each (batch, channel) pair owns an N-vector state that stays in cache, so the discretised
(batch, dim, L, N) tensors are never built. The backward kernel re-runs the forward recurrence of
one channel into private (L, N) buffers (states and decays), walks back through time for the state
gradients alone, and then takes every other gradient step by step; peak extra memory is
threads x 3 x L x N values, not batch x dim x L x N. Channels are split across
threads with ``prange``; the gradients of B and C, which sum over channels, go to one partial
buffer per thread and are summed afterwards (extra memory: threads x the size of B and C).

B and C come in any of ``mamba_ssm``'s layouts (:mod:`matten.ssm.layouts`) and reach the kernels
as (batch, G, L, N) views in scan order, so that the inner loop over the N states reads contiguous
memory; a size-1 batch or time axis is broadcast with stride 0 (never copied), and channel d reads
group d // (dim // G): one kernel serves the variable, grouped and constant layouts.

The kernels also apply the skip term D * u and the gate, and can scan from the last time step to
the first (``reverse``, the backward direction of a bidirectional Mamba), so that neither becomes a
flipped copy of a whole tensor around the scan. Each channel's inputs are first gathered into
per-step vectors in scan order (and its outputs put back after its scan), so that every loop over
steps indexes its arrays by the step itself (:func:`_in_scan_order`). delta's bias and softplus and
the gate's silu(z) (and, for the backward, softplus' and silu') are taken there too, in loops over
time that vectorise (:func:`_activate_channel`): as scalar libm calls inside the loop over time
they had doubled the scan's time, and as torch passes over whole tensors they were a fifth of it.
Threads: as many as torch uses (:mod:`matten.ssm.threads`).

Most of the time goes into exp(delta * A): L x dim x N of them. In float32 they use
:func:`decay`, an exp that LLVM can vectorise over the N states (libm's expf cannot be), and the
softplus its :func:`log1p_unit`; float64 keeps libm's math.exp and math.log1p.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
from numba import types
from numba.extending import overload

from . import layouts, threads

# Reassociation and contraction (FMA) help vectorise the loops over N; no-NaN/no-inf
# assumptions are left out so that bad values still propagate.
_JIT: dict[str, Any] = dict(
    nopython=True,
    nogil=True,
    cache=True,
    parallel=True,
    fastmath={"nsz", "arcp", "contract", "reassoc"},
    # Float division by zero gives inf/nan as in numpy instead of raising: the check Python's
    # semantics need is a branch that keeps the loop over time from vectorising.
    error_model="numpy",
)


def decay(x):
    """exp(x); compiled kernels get the type-specific version below."""
    return math.exp(x)


@overload(decay, inline="always", fastmath=_JIT["fastmath"])  # type: ignore[call-arg]  # stubs lack jit options
def _decay_impl(x):
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return lambda x: math.exp(x)

    def exp_float32(x):
        # exp(x) = 2^k * exp(r), |r| <= ln2 / 2: Taylor to r^6 (relative error < 3e-7), and 2^k
        # written straight into the float's exponent bits. Clamped to float32's normal range.
        x = min(max(x, np.float32(-87.0)), np.float32(88.0))
        # np.floor keeps float32 (math.floor gives an int64, and int64 * float32 is float64:
        # the polynomial then ran in float64 at half the vector width, 2x slower).
        k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
        r = x - k * np.float32(0.693145751953125) - k * np.float32(1.428606765330187e-06)
        p = np.float32(1.0) + r * (
            np.float32(1.0)
            + r
            * (
                np.float32(0.5)
                + r
                * (
                    np.float32(1 / 6)
                    + r * (np.float32(1 / 24) + r * (np.float32(1 / 120) + r * np.float32(1 / 720)))
                )
            )
        )
        return p * np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)

    return exp_float32


def log1p_unit(x):
    """log(1 + x) for x in [0, 1]; compiled kernels get the type-specific version below."""
    return math.log1p(x)


@overload(log1p_unit, inline="always", fastmath=_JIT["fastmath"])  # type: ignore[call-arg]
def _log1p_unit_impl(x):
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return lambda x: math.log1p(x)

    def log1p_float32(x):
        # log(1 + x) = 2 atanh(w), w = x / (2 + x) in [0, 1/3]: the odd series to w^15 (the next
        # term is under 2e-9 of the sum), relatively exact for small x (no 1 + x rounding), and
        # vectorisable where libm's log1pf is not.
        w = x / (np.float32(2.0) + x)
        w2 = w * w
        p = np.float32(1 / 13) + w2 * np.float32(1 / 15)
        p = np.float32(1 / 11) + w2 * p
        p = np.float32(1 / 9) + w2 * p
        p = np.float32(1 / 7) + w2 * p
        p = np.float32(1 / 5) + w2 * p
        p = np.float32(1 / 3) + w2 * p
        return np.float32(2.0) * w * (np.float32(1.0) + w2 * p)

    return log1p_float32


@numba.njit(nogil=True, cache=True, fastmath=_JIT["fastmath"], error_model="numpy")
def _activate_channel(vs, bias, softplus, zs, has_gate, derivatives, dts, dsoftplus, gates, dgates):
    """One channel's per-step activations, in loops over time that vectorise (the scans' loops
    run over the states): the step size ``dts`` = softplus(v + bias) (or v + bias) and, with
    ``has_gate``, the gate ``gates`` = silu(z); with ``derivatives`` also softplus' (sigmoid) into
    ``dsoftplus`` and silu'(z) into ``dgates``. exp is :func:`decay`, as in the scans: in float32
    its clamp puts a floor of exp(-87) = 1.6e-38 under softplus(v) and sigmoid(v) for v < -87."""
    one = dts.dtype.type(1.0)
    zero = dts.dtype.type(0.0)
    length = vs.shape[0]
    if softplus and derivatives:
        for t in range(length):
            v = vs[t] + bias
            e = decay(-abs(v))  # softplus(v) = max(v, 0) + log1p(exp(-|v|)), never overflows
            dts[t] = max(v, zero) + log1p_unit(e)
            dsoftplus[t] = (one if v >= zero else e) / (one + e)  # sigmoid(v)
    elif softplus:
        for t in range(length):
            v = vs[t] + bias
            dts[t] = max(v, zero) + log1p_unit(decay(-abs(v)))
    else:
        for t in range(length):
            dts[t] = vs[t] + bias
    if has_gate and derivatives:
        for t in range(length):
            sig = one / (one + decay(-zs[t]))
            gates[t] = zs[t] * sig
            dgates[t] = sig + gates[t] * (one - sig)  # silu'(z) = sig (1 + z (1 - sig))
    elif has_gate:
        for t in range(length):
            gates[t] = zs[t] / (one + decay(-zs[t]))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _in_scan_order(src, reverse, dst):
    """dst[s] = src[t] for the time t of scan step s (L - 1 - s in reverse; its own inverse, so
    it also puts scan-ordered values back in time order)."""
    length = dst.shape[0]
    if reverse:
        for s in range(length):
            dst[s] = src[length - 1 - s]
    else:
        for s in range(length):
            dst[s] = src[s]


@numba.jit(**_JIT)
def _scan_forward(
    u, delta, bias, softplus, A, Bt, Ct, h0, D, z, has_gate, reverse, groups, y, h_last
):
    # Each channel's inputs are first gathered in scan order (the step size and gate computed
    # on the way, _activate_channel), and its outputs put back after its scan, so that the loops
    # over steps index every array by the step itself: with a computed time index (reversed, or
    # 0 for a time-invariant B) the same loops ran at half the speed (bench/RESULTS.md). Bt and
    # Ct come in scan order, broadcast axes with stride 0.
    batch, dim, length = u.shape
    nstate = A.shape[1]
    per_gB, per_gC = dim // Bt.shape[1], dim // Ct.shape[1]
    per_group = (batch * dim + groups - 1) // groups
    for g in numba.prange(groups):
        h = np.empty(nstate, dtype=u.dtype)
        # One channel's per-step values, in scan order.
        vs = np.empty(length, dtype=u.dtype)
        zs = np.empty(length, dtype=u.dtype)
        us = np.empty(length, dtype=u.dtype)
        dts = np.empty(length, dtype=u.dtype)
        gates = np.empty(length, dtype=u.dtype)
        ys = np.empty(length, dtype=u.dtype)
        unused = np.empty(0, dtype=u.dtype)
        for bd in range(g * per_group, min(batch * dim, (g + 1) * per_group)):
            b = bd // dim
            d = bd % dim
            _in_scan_order(delta[b, d], reverse, vs)
            _in_scan_order(u[b, d], reverse, us)
            if has_gate:
                _in_scan_order(z[b, d], reverse, zs)
            _activate_channel(
                vs, bias[d], softplus, zs, has_gate, False, dts, unused, gates, unused
            )
            B_bd = Bt[b, d // per_gB]  # (L, N): this channel's B, in scan order
            C_bd = Ct[b, d // per_gC]
            h[:] = h0[b, d]
            a = A[d]
            for s in range(length):
                dt = dts[s]
                dtu = dt * us[s]
                acc = u.dtype.type(0.0)
                for n in range(nstate):  # one loop: split in two (decays first) it was 15% slower
                    h_n = decay(dt * a[n]) * h[n] + dtu * B_bd[s, n]
                    h[n] = h_n
                    acc += h_n * C_bd[s, n]
                ys[s] = acc + D[d] * us[s]
            if has_gate:
                for s in range(length):
                    ys[s] *= gates[s]
            _in_scan_order(ys, reverse, y[b, d])
            h_last[b, d] = h


@numba.jit(**_JIT)
def _scan_backward(
    u,
    delta,
    bias,
    softplus,
    A,
    Bt,
    Ct,
    h0,
    D,
    z,
    has_gate,
    reverse,
    dy,
    dh_last,
    du,
    ddelta,
    dz,
    dA_part,
    dB_part,
    dC_part,
    dD_part,
    dbias_part,
    dh0,
):
    # Inputs as _scan_forward takes them (dB_part and dC_part in scan order too, like Bt and
    # Ct); ddelta and dbias_part receive the gradients of delta (through the softplus) and of
    # the bias (per batch and channel), dz that of z.
    batch, dim, length = u.shape
    nstate = A.shape[1]
    per_gB, per_gC = dim // Bt.shape[1], dim // Ct.shape[1]
    groups = dB_part.shape[0]
    total = batch * dim
    per_group = (total + groups - 1) // groups
    for g in numba.prange(groups):
        # Indexed by scan step s: states[s + 1] is the state after step s, states[0] the
        # initial state; decays[s] multiplies states[s] in step s; grads[s] is
        # dLoss/d states[s + 1]. Row L of decays and grads starts the walk back:
        # grads[L] * decays[L] = dh_last.
        states = np.empty((length + 1, nstate), dtype=u.dtype)
        decays = np.empty((length + 1, nstate), dtype=u.dtype)
        grads = np.empty((length + 1, nstate), dtype=u.dtype)
        gA = np.empty(nstate, dtype=u.dtype)
        # One channel's per-step values, in scan order: inputs, the step size, softplus'
        # (when softplus), the gate silu(z), silu', the gated output gradient, and the
        # gradients of u, delta and z.
        vs = np.empty(length, dtype=u.dtype)
        zs = np.empty(length, dtype=u.dtype)
        us = np.empty(length, dtype=u.dtype)
        dys = np.empty(length, dtype=u.dtype)
        dts = np.empty(length, dtype=u.dtype)
        gates = np.empty(length, dtype=u.dtype)
        dgates = np.empty(length, dtype=u.dtype)
        gys = np.empty(length, dtype=u.dtype)
        dsoftplus = np.empty(length if softplus else 0, dtype=u.dtype)
        dus = np.empty(length, dtype=u.dtype)
        dvs = np.empty(length, dtype=u.dtype)
        dzs = np.empty(length, dtype=u.dtype)
        for bd in range(g * per_group, min(total, (g + 1) * per_group)):
            b = bd // dim
            d = bd % dim
            _in_scan_order(delta[b, d], reverse, vs)
            _in_scan_order(u[b, d], reverse, us)
            _in_scan_order(dy[b, d], reverse, dys)
            if has_gate:
                _in_scan_order(z[b, d], reverse, zs)
            _activate_channel(
                vs, bias[d], softplus, zs, has_gate, True, dts, dsoftplus, gates, dgates
            )
            for s in range(length):
                gys[s] = dys[s] * gates[s] if has_gate else dys[s]
            B_bd, dB_bd = Bt[b, d // per_gB], dB_part[g, b, d // per_gB]
            C_bd, dC_bd = Ct[b, d // per_gC], dC_part[g, b, d // per_gC]
            a = A[d]
            Dd = D[d]
            # 1. The forward recurrence again, as _scan_forward runs it.
            states[0] = h0[b, d]
            for s in range(length):
                dt = dts[s]
                dtu = dt * us[s]
                for n in range(nstate):
                    e = decay(dt * a[n])
                    decays[s, n] = e
                    states[s + 1, n] = e * states[s, n] + dtu * B_bd[s, n]
            # 2. Back through time: the state gradients alone, the only sequential part.
            # Loops that write one array and reduce nothing vectorise over the N states; with
            # the per-step gradients below folded in (four arrays written, three sums) the
            # loop ran scalar and took 1.6x as long.
            grads[length] = dh_last[b, d]
            decays[length] = 1.0
            for s in range(length - 1, -1, -1):
                g_y = gys[s]
                for n in range(nstate):
                    grads[s, n] = grads[s + 1, n] * decays[s + 1, n] + g_y * C_bd[s, n]
            for n in range(nstate):
                dh0[b, d, n] = grads[0, n] * decays[0, n]
            # 3. Every other gradient, step by step; no step depends on another.
            gA[:] = 0.0
            gD = u.dtype.type(0.0)
            for s in range(length):
                dt = dts[s]
                ut = us[s]
                g_y = gys[s]
                dtu = dt * ut
                gu = u.dtype.type(0.0)
                gdt = u.dtype.type(0.0)
                acc = u.dtype.type(0.0)  # <C_t, h_t>, for the gate's gradient
                for n in range(nstate):
                    g_h = grads[s, n]
                    h_n = states[s + 1, n]
                    acc += h_n * C_bd[s, n]
                    gu += g_h * B_bd[s, n]
                    dB_bd[s, n] += g_h * dtu
                    dC_bd[s, n] += g_y * h_n
                    g_decay = g_h * states[s, n] * decays[s, n]
                    gdt += g_decay * a[n]
                    gA[n] += g_decay * dt
                dzs[s] = dys[s] * (acc + Dd * ut)
                gD += g_y * ut
                dus[s] = gu * dt + g_y * Dd
                dvs[s] = gdt + gu * ut  # the step size's gradient; the softplus' follows
            if softplus:
                for s in range(length):
                    dvs[s] *= dsoftplus[s]
            gbias = u.dtype.type(0.0)
            for s in range(length):
                gbias += dvs[s]
            _in_scan_order(dus, reverse, du[b, d])
            _in_scan_order(dvs, reverse, ddelta[b, d])
            if has_gate:
                for s in range(length):
                    dzs[s] *= dgates[s]
                _in_scan_order(dzs, reverse, dz[b, d])
            dA_part[b, d] = gA
            dD_part[b, d] = gD
            dbias_part[b, d] = gbias


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t`` with its strides (a copy only when numpy cannot view it)."""
    t = t.detach()
    return t.numpy() if all(st >= 0 for st in t.stride()) else t.contiguous().numpy()


def _time_major(X: torch.Tensor, reverse: bool, batch: int, length: int) -> np.ndarray:
    """B or C in any layout -> (batch, G, L, N) in scan order (time flipped when ``reverse``),
    contiguous over the N states (the loops over them vectorise only over contiguous memory);
    a size-1 batch or time axis is broadcast with stride 0, so a time-invariant B is never
    copied along time."""
    X4 = layouts.as_grouped(X.detach()).transpose(2, 3)
    X4 = (X4.flip(2) if reverse else X4).contiguous()
    return X4.expand(batch, X4.shape[1], length, X4.shape[3]).numpy()


def _no_gate(like: torch.Tensor) -> np.ndarray:
    """The (1, 1, 0) placeholder for z and dz when there is no gate (the kernels are told so by
    ``has_gate`` and never index it)."""
    return np.zeros((1, 1, 0), dtype=_np(like).dtype)


def _bias_of(delta_bias, like: torch.Tensor) -> np.ndarray:
    """delta's per-channel bias, zeros when there is none."""
    if delta_bias is None:
        return np.zeros(like.shape[1], dtype=_np(like).dtype)
    return _np(delta_bias)


def scan_forward(
    u, delta, A, B, C, h0, D=None, z=None, delta_bias=None, softplus=False, reverse=False
):
    """The gated output ``(<C_t, h_t> + D u_t) * silu(z_t)`` (batch, dim, L) and the last state
    (batch, dim, N), with delta = softplus(delta + delta_bias) when ``softplus``. ``reverse`` scans
    from the last time step to the first (the last state is then the one at t = 0). Inputs are
    read with their strides; every tensor has the dtype of u (float32 or float64)."""
    batch, dim, length = u.shape
    groups = max(1, min(threads.follow_torch(), batch * dim))  # one channel range per thread
    y = torch.empty(u.shape, dtype=u.dtype)
    h_last = torch.empty_like(h0)
    _scan_forward(
        _np(u),
        _np(delta),
        _bias_of(delta_bias, u),
        bool(softplus),
        _np(A),
        _time_major(B, reverse, batch, length),
        _time_major(C, reverse, batch, length),
        _np(h0),
        _np(D) if D is not None else np.zeros(dim, dtype=_np(u).dtype),
        _np(z) if z is not None else _no_gate(u),
        z is not None,
        bool(reverse),
        groups,
        y.numpy(),
        h_last.numpy(),
    )
    return y, h_last


def _partials(X, groups, dtype) -> torch.Tensor:
    """One zeroed gradient buffer of B or C per thread group: (groups, batch or 1, G, L or 1, N),
    in scan order like :func:`_time_major`'s view."""
    X4 = layouts.as_grouped(X)
    return torch.zeros(groups, X4.shape[0], X4.shape[1], X4.shape[3], X4.shape[2], dtype=dtype)


def _partials_view(part: torch.Tensor, batch: int, length: int) -> np.ndarray:
    """The kernels' (groups, batch, G, L, N) view of :func:`_partials`' buffer: broadcast axes
    have stride 0, so their steps add up in place."""
    return part.expand(part.shape[0], batch, part.shape[2], length, part.shape[4]).numpy()


def _summed(part, like, reverse):
    """Sum of the per-thread partials, back in time order and in the layout of ``like``."""
    total = part.sum(0)
    return (total.flip(2) if reverse else total).transpose(2, 3).reshape(like.shape)


def scan_backward(
    u,
    delta,
    A,
    B,
    C,
    h0,
    dy,
    dh_last,
    D=None,
    z=None,
    delta_bias=None,
    softplus=False,
    reverse=False,
):
    """Gradients of :func:`scan_forward`'s outputs with respect to u, delta, A, B, C, the initial
    state, D, z and delta_bias (None for those not given)."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    groups = max(1, min(threads.follow_torch(), batch * dim))
    du = torch.empty(u.shape, dtype=u.dtype)
    ddelta = torch.empty(u.shape, dtype=u.dtype)
    dz = torch.empty(u.shape, dtype=u.dtype) if z is not None else None
    dA_part = torch.empty(batch, dim, nstate, dtype=u.dtype)
    dD_part = torch.empty(batch, dim, dtype=u.dtype)
    dB_part, dC_part = _partials(B, groups, u.dtype), _partials(C, groups, u.dtype)
    dbias_part = torch.empty(batch, dim, dtype=u.dtype)
    dh0 = torch.empty_like(h0)
    _scan_backward(
        _np(u),
        _np(delta),
        _bias_of(delta_bias, u),
        bool(softplus),
        _np(A),
        _time_major(B, reverse, batch, length),
        _time_major(C, reverse, batch, length),
        _np(h0),
        _np(D) if D is not None else np.zeros(dim, dtype=_np(u).dtype),
        _np(z) if z is not None else _no_gate(u),
        z is not None,
        bool(reverse),
        _np(dy),
        _np(dh_last),
        du.numpy(),
        ddelta.numpy(),
        dz.numpy() if dz is not None else _no_gate(u),
        dA_part.numpy(),
        _partials_view(dB_part, batch, length),
        _partials_view(dC_part, batch, length),
        dD_part.numpy(),
        dbias_part.numpy(),
        dh0.numpy(),
    )
    return (
        du,
        ddelta,
        dA_part.sum(0),
        _summed(dB_part, B, reverse),
        _summed(dC_part, C, reverse),
        dh0,
        dD_part.sum(0) if D is not None else None,
        dz,
        dbias_part.sum(0) if delta_bias is not None else None,
    )
