"""Fast CPU selective scan: compiled (numba) loops over time, LANES channels side by side.

The channels of one batch element are scanned in blocks of LANES, one channel per vector lane:
a block's per-step values are (L, LANES) arrays and its states (N, LANES), so that every loop
over lanes vectorises and each step's sums over the N states are vertical adds of lane vectors
(bench/RESULTS.md has what it replaced). The discretised (batch, dim, L, N) tensors are never
built. One kernel serves mamba_ssm's variable, grouped and constant layouts
(:mod:`matten.ssm.layouts`): a variable or grouped B or C reaches the kernels as a (batch, G, L,
N) copy in scan order, contiguous over the N states, and a block never crosses one of its
groups, so that its lanes share each step's row; a constant (dim, N) B or C is read per lane,
each lane its own channel's row (see :func:`_coefficient`).

The forward also returns the state before every CHUNK-th step. The backward recomputes one
chunk's states and decays from its checkpoint into buffers of CHUNK steps, then walks back
through the chunk, taking the state gradient and every other gradient in the same loop. Extra
memory per thread: a dozen (L, LANES) arrays and the per-lane gradients of B and C, (L, N,
LANES) each ((1, N, LANES) for a constant); the checkpoints are L / CHUNK states per channel.
Blocks are split across threads with ``prange``; the gradients of B and C, which sum over
channels, go to one partial buffer per thread and are summed afterwards.

The kernels also apply delta's bias and softplus, the skip term D * u and the gate silu(z), and
can scan from the last time step to the first (``reverse``, the backward direction of a
bidirectional Mamba), so that none of these becomes a torch pass or a flipped copy of a whole
tensor around the scan: each block's inputs are gathered into lanes in scan order, and its
outputs put back in time order, so that every loop over steps indexes its arrays by the step
itself. Threads: as many as torch uses (:mod:`matten.ssm.threads`).

Most of the time goes into exp(delta * A): L x dim x N of them. In float32 they use
:func:`decay`, an exp that LLVM can vectorise (libm's expf cannot be), and the softplus its
:func:`log1p_unit`; float64 keeps libm's math.exp and math.log1p.
"""

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
from numba import types
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.core.compiler_machinery import register_pass
from numba.core.lowering import Lower
from numba.core.typed_passes import NativeLowering
from numba.extending import overload

from . import layouts, threads

# Reassociation and contraction (FMA) help vectorise the loops; no-NaN/no-inf
# assumptions are left out so that bad values still propagate.
PARALLEL_JIT: dict[str, Any] = dict(
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


@overload(decay, inline="always", fastmath=PARALLEL_JIT["fastmath"])  # type: ignore[call-arg]  # stubs lack jit options
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


@overload(log1p_unit, inline="always", fastmath=PARALLEL_JIT["fastmath"])  # type: ignore[call-arg]
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


# Channels per block, one per vector lane (see the module's docstring). A block of fewer
# channels leaves its last lanes idle: their inputs are zero, and so are their states and
# gradients while B and C are finite.
LANES = 16
# The backward recomputes the states chunk by chunk from checkpoints (one every CHUNK steps),
# so that its states and decays stay in cache at any length.
CHUNK = 64


class _WideLower(Lower):
    """numba's lowering, with each function asking LLVM for vectors as wide as the CPU's. On
    CPUs with AVX-512 LLVM prefers 256-bit vectors unless told otherwise (512-bit instructions
    once lowered older Xeons' clock); a block's LANES float32 lanes are one 512-bit vector, and
    with them the kernels run 17-22% faster (bench/RESULTS.md). Elsewhere nothing changes."""

    def pre_lower(self):
        super().pre_lower()
        # string attributes, which llvmlite's FunctionAttributes does not list: set.add
        attributes = self.builder.function.attributes
        set.add(attributes, '"prefer-vector-width"="512"')
        set.add(attributes, '"min-legal-vector-width"="512"')  # or codegen splits them in two


@register_pass(mutates_CFG=True, analysis_only=False)
class _WideLowering(NativeLowering):
    _name = "matten_wide_lowering"

    @property
    def lowering_class(self):
        return _WideLower


class _LaneCompiler(CompilerBase):
    """numba's nopython pipeline for the loops over lanes, with two changes.

    Every array argument is marked ``noalias``: LLVM vectorises a loop over arrays that might
    overlap only behind runtime overlap checks, and refuses those checks in short loops such as
    the ones over lanes: they stayed scalar. The functions compiled with it must never be given
    two arrays that overlap where either is written.

    Functions are lowered by :class:`_WideLower`, for the CPU's widest vectors."""

    def define_pipelines(self):
        self.state.flags.noalias = True
        pipeline = DefaultPassBuilder.define_nopython_pipeline(self.state)
        pipeline.passes = [
            (_WideLowering if cls is NativeLowering else cls, description)
            for cls, description in pipeline.passes
        ]
        return [pipeline]


_LANE_JIT: dict[str, Any] = dict(
    nopython=True,
    nogil=True,
    cache=True,
    fastmath=PARALLEL_JIT["fastmath"],
    error_model="numpy",
    pipeline_class=_LaneCompiler,
)


# B and C reach a block's lane loops in one of two forms: shared, an (L, N) array in scan
# order whose row for a step every lane reads (variable and grouped layouts, a block never
# crossing a group), or per lane, a (1, N, LANES) array constant in time (the constant layout,
# one B per channel). The accessors below pick by the array's dimensions, so one source serves
# both and numba compiles each form on its own.


def _coefficient(X, s, n, k):
    """B or C of scan step s, state n, lane k."""
    return X[s, n] if X.ndim == 2 else X[0, n, k]


@overload(_coefficient, inline="always")
def _coefficient_impl(X, s, n, k):
    if X.ndim == 2:
        return lambda X, s, n, k: X[s, n]  # loop-invariant over the lanes: loaded once
    return lambda X, s, n, k: X[0, n, k]


def _coefficient_step(X, s):
    """The row of the per-lane gradient buffer of B or C that step s adds to: s when shared, 0
    when per lane (a constant's gradient sums over the steps)."""
    return s if X.ndim == 2 else 0


@overload(_coefficient_step, inline="always")
def _coefficient_step_impl(X, s):
    if X.ndim == 2:
        return lambda X, s: s
    return lambda X, s: 0


@numba.jit(**_LANE_JIT)
def _activate(vs, bias, softplus, zs, has_gate, derivatives, dts, dsoftplus, gates, dgates):
    """A block's per-step activations, (L, LANES) arrays: the step size ``dts`` =
    softplus(v + bias) (or v + bias; bias per lane) and, with ``has_gate``, the gate ``gates``
    = silu(z); with ``derivatives`` also softplus' (sigmoid) into ``dsoftplus`` and silu'(z)
    into ``dgates``. exp is :func:`decay`, as in the scans: in float32 its clamp puts a floor of
    exp(-87) = 1.6e-38 under softplus(v) and sigmoid(v) for v < -87."""
    one = dts.dtype.type(1.0)
    zero = dts.dtype.type(0.0)
    length, lanes = vs.shape
    for s in range(length):
        if softplus and derivatives:
            for k in range(lanes):
                v = vs[s, k] + bias[k]
                e = decay(-abs(v))  # softplus(v) = max(v, 0) + log1p(exp(-|v|)), never overflows
                dts[s, k] = max(v, zero) + log1p_unit(e)
                dsoftplus[s, k] = (one if v >= zero else e) / (one + e)  # sigmoid(v)
        elif softplus:
            for k in range(lanes):
                v = vs[s, k] + bias[k]
                dts[s, k] = max(v, zero) + log1p_unit(decay(-abs(v)))
        else:
            for k in range(lanes):
                dts[s, k] = vs[s, k] + bias[k]
        if has_gate and derivatives:
            for k in range(lanes):
                sig = one / (one + decay(-zs[s, k]))
                gates[s, k] = zs[s, k] * sig
                dgates[s, k] = sig + gates[s, k] * (one - sig)  # silu'(z) = sig (1 + z (1 - sig))
        elif has_gate:
            for k in range(lanes):
                gates[s, k] = zs[s, k] / (one + decay(-zs[s, k]))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _rows_to_lanes(rows, first, count, reverse, lanes):
    """lanes[s, k] = rows[first + k, t] for the time t of scan step s (L - 1 - s when
    ``reverse``), for the block's ``count`` channels; idle lanes get zeros."""
    length = lanes.shape[0]
    # One time step's lanes at a time (2x faster than a lane at a time), in time order whatever
    # the direction: the rows are then read front to back, which in reverse scans took 13% off
    # both kernels against reading them from the back (bench/RESULTS.md).
    for t in range(length):
        s = length - 1 - t if reverse else t
        for k in range(LANES):
            lanes[s, k] = rows[first + k, t] if k < count else lanes.dtype.type(0.0)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _lanes_to_rows(lanes, first, count, reverse, rows):
    """The inverse of :func:`_rows_to_lanes` for the block's channels: back in time order."""
    length = lanes.shape[0]
    for t in range(length):  # rows written front to back, as _rows_to_lanes reads them
        s = length - 1 - t if reverse else t
        for k in range(count):
            rows[first + k, t] = lanes[s, k]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _per_lane(values, first, count, lanes):
    """lanes[..., k] = values[first + k] (a (dim,) or (dim, N) array), idle lanes zero."""
    for k in range(LANES):
        if k < count:
            lanes[..., k] = values[first + k]
        else:
            lanes[..., k] = 0.0


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _block_inputs(delta, u, z, bias, A, D, has_gate, reverse, b, first, count, lanes):
    """A block's inputs into lanes, as both kernels start: ``lanes`` = (v_l, u_l, z_l, bias_l,
    a_l, d_l), delta (before its bias and softplus), u and z in scan order, and the channels'
    bias, A and D."""
    v_l, u_l, z_l, bias_l, a_l, d_l = lanes
    _rows_to_lanes(delta[b], first, count, reverse, v_l)
    _rows_to_lanes(u[b], first, count, reverse, u_l)
    if has_gate:
        _rows_to_lanes(z[b], first, count, reverse, z_l)
    _per_lane(bias, first, count, bias_l)
    _per_lane(A, first, count, a_l)
    _per_lane(D, first, count, d_l)


@numba.jit(**_LANE_JIT)
def _lanes_forward(dt_l, u_l, gate_l, a_l, d_l, B_b, C_b, h, y_l, checkpoints, dtu, acc):
    """A block's scan: states h (N, LANES) carried through every step, outputs into y_l, and
    the state before every CHUNK-th step into checkpoints, for the backward."""
    for s in range(dt_l.shape[0]):
        if s % CHUNK == 0:
            checkpoints[s // CHUNK] = h
        for k in range(LANES):
            dtu[k] = dt_l[s, k] * u_l[s, k]
            acc[k] = 0.0
        for n in range(h.shape[0]):
            for k in range(LANES):
                h_nk = decay(dt_l[s, k] * a_l[n, k]) * h[n, k] + dtu[k] * _coefficient(B_b, s, n, k)
                h[n, k] = h_nk
                acc[k] += h_nk * _coefficient(C_b, s, n, k)
        for k in range(LANES):
            y_l[s, k] = (acc[k] + d_l[k] * u_l[s, k]) * gate_l[s, k]


@numba.jit(**_LANE_JIT)
def _lanes_chunk_states(s0, m, dt_l, u_l, a_l, B_b, states, decays, dtu):
    """Steps s0 .. s0 + m - 1 again from states[0]: states[j + 1] after step s0 + j, decays[j]
    the factor on states[j] there."""
    for j in range(m):
        s = s0 + j
        for k in range(LANES):
            dtu[k] = dt_l[s, k] * u_l[s, k]
        for n in range(states.shape[1]):
            for k in range(LANES):
                e = decay(dt_l[s, k] * a_l[n, k])
                decays[j, n, k] = e
                states[j + 1, n, k] = e * states[j, n, k] + dtu[k] * _coefficient(B_b, s, n, k)


@numba.jit(**_LANE_JIT)
def _lanes_gradients(
    s0,
    m,
    dt_l,
    u_l,
    gy_l,
    gz_l,
    dsp_l,
    a_l,
    d_l,
    B_b,
    C_b,
    states,
    decays,
    carry,
    dB_l,
    dC_l,
    gA,
    gD,
    du_l,
    dv_l,
    dz_l,
    dtu,
    acc,
    gu,
    gdt,
):
    """A chunk's gradients, from its last step back to its first: the state gradient (carry:
    dLoss/d the state after the chunk, through the next step's decay, on entry; the same for the
    chunk before on exit), and from it those of u, the step size (through softplus' dsp_l) and
    the gate's input into du_l, dv_l and dz_l, those of B and C per lane into dB_l and dC_l, and
    those of A and D summed into gA and gD. dtu, acc, gu and gdt (LANES,) hold each step's dt u
    and sums over the states; their own arguments, so that LLVM knows they overlap nothing."""
    # The lanes are counted at run time (LANES read from a shape): with the constant, LLVM
    # unrolled the loops over lanes and then left them scalar (2.5x slower), where the exp-bound
    # loops above are faster with it.
    lanes = gA.shape[1]
    for j in range(m - 1, -1, -1):
        s = s0 + j
        s_B, s_C = _coefficient_step(B_b, s), _coefficient_step(C_b, s)
        for k in range(lanes):
            dtu[k] = dt_l[s, k] * u_l[s, k]
            acc[k] = 0.0  # <C_t, h_t>, for the gate's gradient
            gu[k] = 0.0
            gdt[k] = 0.0
        for n in range(states.shape[1]):
            for k in range(lanes):
                b_n = _coefficient(B_b, s, n, k)
                c_n = _coefficient(C_b, s, n, k)
                g_h = carry[n, k] + gy_l[s, k] * c_n  # dLoss/d states[j + 1]
                carry[n, k] = g_h * decays[j, n, k]
                h_n = states[j + 1, n, k]
                acc[k] += h_n * c_n
                gu[k] += g_h * b_n
                dB_l[s_B, n, k] += g_h * dtu[k]
                dC_l[s_C, n, k] += gy_l[s, k] * h_n
                g_decay = g_h * states[j, n, k] * decays[j, n, k]
                gdt[k] += g_decay * a_l[n, k]
                gA[n, k] += g_decay * dt_l[s, k]
        for k in range(lanes):
            ut = u_l[s, k]
            g_y = gy_l[s, k]
            dz_l[s, k] = gz_l[s, k] * (acc[k] + d_l[k] * ut)
            gD[k] += g_y * ut
            du_l[s, k] = gu[k] * dt_l[s, k] + g_y * d_l[k]
            dv_l[s, k] = (gdt[k] + gu[k] * ut) * dsp_l[s, k]


@numba.jit(**_LANE_JIT)
def _gate_gradients(dy_l, gate_l, dgate_l, has_gate, gy_l, gz_l):
    """The output gradient through the gate (gy = dy silu(z)) and the gate's own factor
    (gz = dy silu'(z), times <C, h> + D u later)."""
    length, lanes = dy_l.shape
    for s in range(length):
        for k in range(lanes):
            gy_l[s, k] = dy_l[s, k] * gate_l[s, k]
            gz_l[s, k] = dy_l[s, k] * dgate_l[s, k] if has_gate else 0.0


@numba.njit(nogil=True, cache=True)
def _block_of(index, dim, span):
    """The batch element, first channel and channel count of block ``index``: blocks of up to
    LANES channels that never cross a span of ``span`` channels (within a span every channel
    reads the same group of B and of C)."""
    per_span = (span + LANES - 1) // LANES
    per_batch = (dim // span) * per_span
    b = index // per_batch
    span_index = (index % per_batch) // per_span
    first = (index % per_span) * LANES
    return b, span_index * span + first, min(LANES, span - first)


@numba.njit(nogil=True, cache=True)
def _block_count(batch, dim, span):
    return batch * (dim // span) * ((span + LANES - 1) // LANES)


@numba.njit(nogil=True, cache=True)
def _group_of(X, dim, first):
    """The group of a (batch, G, L, N) B or C that channel ``first`` reads."""
    return first // (dim // X.shape[1])


def _block_coefficients(X, dim, b, first, count, per_lane):
    """The block's B or C in the form its lane loops read (see _coefficient): from a (batch, G,
    L, N) X in scan order its group's (L, N) view, shared by the lanes; from a constant (dim, N)
    X each lane's own row, gathered into per_lane (1, N, LANES)."""
    raise NotImplementedError("compiled kernels only: see the overload below")


@overload(_block_coefficients)
def _block_coefficients_impl(X, dim, b, first, count, per_lane):
    if X.ndim == 4:
        return lambda X, dim, b, first, count, per_lane: X[b, _group_of(X, dim, first)]

    def gathered(X, dim, b, first, count, per_lane):
        _per_lane(X, first, count, per_lane[0])
        return per_lane

    return gathered


def _coefficient_key(X, dim, b, first):
    """Which gradient of B or C a block's lanes add to: batch element x G + group when shared
    (blocks of one group add up in the same lanes), the block's first channel when per lane
    (the batch elements of one block of channels add up in them)."""
    raise NotImplementedError("compiled kernels only: see the overload below")


@overload(_coefficient_key)
def _coefficient_key_impl(X, dim, b, first):
    if X.ndim == 4:
        return lambda X, dim, b, first: b * X.shape[1] + _group_of(X, dim, first)
    return lambda X, dim, b, first: first


def _coefficient_rows(X, length):
    """Steps of the per-lane gradient buffer of B or C: L when shared, 1 when per lane."""
    raise NotImplementedError("compiled kernels only: see the overload below")


@overload(_coefficient_rows)
def _coefficient_rows_impl(X, length):
    if X.ndim == 4:
        return lambda X, length: length
    return lambda X, length: 1


@numba.jit(**PARALLEL_JIT)
def _scan_forward(
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
    span,
    groups,
    y,
    h_last,
    checkpoints,
):
    # Each block's inputs are gathered into lanes in scan order (_rows_to_lanes), its outputs
    # put back in time order after its scan, so that the loops over steps index every array by
    # the step itself (bench/RESULTS.md). Bt and Ct come as _kernel_coefficients gives them
    # (in scan order unless constant). checkpoints (batch, dim, chunks, N) receives the state
    # before every CHUNK-th step, from which the backward recomputes the states.
    batch, dim, length = u.shape
    nstate = A.shape[1]
    dtype = u.dtype
    blocks = _block_count(batch, dim, span)
    per_group = (blocks + groups - 1) // groups
    chunks = checkpoints.shape[2]
    for g in numba.prange(groups):
        v_l = np.empty((length, LANES), dtype=dtype)  # delta, before bias and softplus
        z_l = np.empty((length, LANES), dtype=dtype)
        dt_l = np.empty((length, LANES), dtype=dtype)
        u_l = np.empty((length, LANES), dtype=dtype)
        gate_l = np.ones((length, LANES), dtype=dtype)
        y_l = np.empty((length, LANES), dtype=dtype)
        bias_l = np.empty(LANES, dtype=dtype)
        a_l = np.empty((nstate, LANES), dtype=dtype)
        h = np.empty((nstate, LANES), dtype=dtype)
        d_l = np.empty(LANES, dtype=dtype)
        checkpoints_l = np.empty((chunks, nstate, LANES), dtype=dtype)
        dtu = np.empty(LANES, dtype=dtype)
        acc = np.empty(LANES, dtype=dtype)
        B_lanes = np.empty((1, nstate, LANES), dtype=dtype)  # per-lane B and C (constant layout)
        C_lanes = np.empty((1, nstate, LANES), dtype=dtype)
        unused_dsoftplus = np.empty((0, LANES), dtype=dtype)  # no derivatives in the forward
        unused_dgates = np.empty((0, LANES), dtype=dtype)
        inputs_l = (v_l, u_l, z_l, bias_l, a_l, d_l)  # filled by _block_inputs
        for block in range(g * per_group, min(blocks, (g + 1) * per_group)):
            b, first, count = _block_of(block, dim, span)
            _block_inputs(delta, u, z, bias, A, D, has_gate, reverse, b, first, count, inputs_l)
            _activate(
                v_l,
                bias_l,
                softplus,
                z_l,
                has_gate,
                False,
                dt_l,
                unused_dsoftplus,
                gate_l,
                unused_dgates,
            )
            _per_lane(h0[b], first, count, h)
            B_b = _block_coefficients(Bt, dim, b, first, count, B_lanes)
            C_b = _block_coefficients(Ct, dim, b, first, count, C_lanes)
            _lanes_forward(dt_l, u_l, gate_l, a_l, d_l, B_b, C_b, h, y_l, checkpoints_l, dtu, acc)
            _lanes_to_rows(y_l, first, count, reverse, y[b])
            for k in range(count):
                h_last[b, first + k] = h[:, k]
                checkpoints[b, first + k] = checkpoints_l[:, :, k]


@numba.njit(nogil=True, cache=True)
def _add_lanes(part, lanes, used):
    """part[s, n] += the sum over the first ``used`` lanes of lanes[s, n, :], then lanes = 0:
    all of them, since an idle lane's 0 * inf in a non-finite B or C must not reach a later
    block's sum."""
    length, nstate, nlanes = lanes.shape
    for s in range(length):
        for n in range(nstate):
            total = lanes.dtype.type(0.0)
            for k in range(used):
                total += lanes[s, n, k]
            part[s, n] += total
            for k in range(nlanes):
                lanes[s, n, k] = 0.0


def _add_held(part, lanes, held, used):
    """Add the per-lane gradients of B or C for ``held`` (see _coefficient_key) into the
    thread's partials ``part``, then zero every lane: shared, part is (batch, G, L, N) and the
    lanes are summed; per lane, part is (dim, N) and lane k is channel held + k's."""
    raise NotImplementedError("compiled kernels only: see the overload below")


@overload(_add_held)
def _add_held_impl(part, lanes, held, used):
    if part.ndim == 4:

        def shared(part, lanes, held, used):
            ngroups = part.shape[1]
            _add_lanes(part[held // ngroups, held % ngroups], lanes, used)

        return shared

    def per_lane(part, lanes, held, used):
        for k in range(used):
            part[held + k] += lanes[0, :, k]
        lanes[...] = 0.0

    return per_lane


@numba.njit(nogil=True, cache=True)
def _lane_partials_for(part, lanes, held, block_key, used, count):
    """The per-lane gradients of B or C hold those of ``held`` (see _coefficient_key) from
    blocks using ``used`` lanes: when the next block adds to another (``block_key``; -1 at the
    end) they are added into the thread's partials ``part`` (_add_held). Returns the key and
    lane count they hold then."""
    if block_key == held:
        return held, max(used, count)
    if held >= 0:
        _add_held(part, lanes, held, used)
    return block_key, count


@numba.jit(**PARALLEL_JIT)
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
    span,
    checkpoints,
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
    # Inputs as _scan_forward takes them, with the forward's checkpoints (dB_part and dC_part
    # per thread in the form of Bt and Ct, see _partials); ddelta and dbias_part receive the
    # gradients of delta (through the softplus) and of the bias (per batch and channel), dz
    # that of z.
    batch, dim, length = u.shape
    nstate = A.shape[1]
    dtype = u.dtype
    groups = dB_part.shape[0]
    blocks = _block_count(batch, dim, span)
    per_group = (blocks + groups - 1) // groups
    chunks = (length + CHUNK - 1) // CHUNK
    for g in numba.prange(groups):
        # The block's per-step values, a lane per channel: delta before its activation, z, the
        # step size, input and output gradient, the gate and its derivative, softplus' (1
        # without softplus), the output gradient through the gate and the gate's own factor
        # (_gate_gradients), and the gradients of u, delta and z.
        v_l = np.empty((length, LANES), dtype=dtype)
        z_l = np.empty((length, LANES), dtype=dtype)
        dt_l = np.empty((length, LANES), dtype=dtype)
        u_l = np.empty((length, LANES), dtype=dtype)
        dy_l = np.empty((length, LANES), dtype=dtype)
        gate_l = np.ones((length, LANES), dtype=dtype)
        dgate_l = np.empty((length, LANES), dtype=dtype)
        dsp_l = np.ones((length, LANES), dtype=dtype)
        gy_l = np.empty((length, LANES), dtype=dtype)
        gz_l = np.empty((length, LANES), dtype=dtype)
        du_l = np.empty((length, LANES), dtype=dtype)
        dv_l = np.empty((length, LANES), dtype=dtype)
        dz_l = np.empty((length, LANES), dtype=dtype)
        bias_l = np.empty(LANES, dtype=dtype)
        a_l = np.empty((nstate, LANES), dtype=dtype)
        d_l = np.empty(LANES, dtype=dtype)
        inputs_l = (v_l, u_l, z_l, bias_l, a_l, d_l)  # filled by _block_inputs
        # The state before every CHUNK-th step, and one chunk's states and decays (see
        # _lanes_chunk_states).
        checkpoints_l = np.empty((chunks, nstate, LANES), dtype=dtype)
        states = np.empty((CHUNK + 1, nstate, LANES), dtype=dtype)
        decays = np.empty((CHUNK, nstate, LANES), dtype=dtype)
        carry = np.empty((nstate, LANES), dtype=dtype)
        gA = np.empty((nstate, LANES), dtype=dtype)
        gD = np.empty(LANES, dtype=dtype)
        # Each step's dt u and sums over the states (see _lanes_gradients).
        dtu = np.empty(LANES, dtype=dtype)
        acc = np.empty(LANES, dtype=dtype)
        gu = np.empty(LANES, dtype=dtype)
        gdt = np.empty(LANES, dtype=dtype)
        # The gradients of B and C, per lane, for held_B / held_C (see _coefficient_key and
        # _lane_partials_for).
        dB_l = np.zeros((_coefficient_rows(Bt, length), nstate, LANES), dtype=dtype)
        dC_l = np.zeros((_coefficient_rows(Ct, length), nstate, LANES), dtype=dtype)
        B_lanes = np.empty((1, nstate, LANES), dtype=dtype)  # per-lane B and C (constant layout)
        C_lanes = np.empty((1, nstate, LANES), dtype=dtype)
        held_B, used_B = -1, 0
        held_C, used_C = -1, 0
        for block in range(g * per_group, min(blocks, (g + 1) * per_group)):
            b, first, count = _block_of(block, dim, span)
            held_B, used_B = _lane_partials_for(
                dB_part[g], dB_l, held_B, _coefficient_key(Bt, dim, b, first), used_B, count
            )
            held_C, used_C = _lane_partials_for(
                dC_part[g], dC_l, held_C, _coefficient_key(Ct, dim, b, first), used_C, count
            )
            _block_inputs(delta, u, z, bias, A, D, has_gate, reverse, b, first, count, inputs_l)
            _rows_to_lanes(dy[b], first, count, reverse, dy_l)
            _activate(v_l, bias_l, softplus, z_l, has_gate, True, dt_l, dsp_l, gate_l, dgate_l)
            _gate_gradients(dy_l, gate_l, dgate_l, has_gate, gy_l, gz_l)
            _per_lane(checkpoints[b], first, count, checkpoints_l)
            _per_lane(dh_last[b], first, count, carry)
            B_b = _block_coefficients(Bt, dim, b, first, count, B_lanes)
            C_b = _block_coefficients(Ct, dim, b, first, count, C_lanes)
            gA[:] = 0.0
            gD[:] = 0.0
            for c in range(chunks - 1, -1, -1):
                s0 = c * CHUNK
                m = min(CHUNK, length - s0)
                states[0] = checkpoints_l[c]
                _lanes_chunk_states(s0, m, dt_l, u_l, a_l, B_b, states, decays, dtu)
                _lanes_gradients(
                    s0,
                    m,
                    dt_l,
                    u_l,
                    gy_l,
                    gz_l,
                    dsp_l,
                    a_l,
                    d_l,
                    B_b,
                    C_b,
                    states,
                    decays,
                    carry,
                    dB_l,
                    dC_l,
                    gA,
                    gD,
                    du_l,
                    dv_l,
                    dz_l,
                    dtu,
                    acc,
                    gu,
                    gdt,
                )
            _lanes_to_rows(du_l, first, count, reverse, du[b])
            _lanes_to_rows(dv_l, first, count, reverse, ddelta[b])
            if has_gate:
                _lanes_to_rows(dz_l, first, count, reverse, dz[b])
            for k in range(count):
                d = first + k
                dbias_part[b, d] = ddelta[b, d].sum()
                dA_part[b, d] = gA[:, k]
                dD_part[b, d] = gD[k]
                dh0[b, d] = carry[:, k]
        _lane_partials_for(dB_part[g], dB_l, held_B, -1, used_B, 0)
        _lane_partials_for(dC_part[g], dC_l, held_C, -1, used_C, 0)


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of ``t`` with its strides (a copy only when numpy cannot view it)."""
    t = t.detach()
    return t.numpy() if all(st >= 0 for st in t.stride()) else t.contiguous().numpy()


def _kernel_coefficients(X: torch.Tensor, reverse: bool) -> np.ndarray:
    """B or C as the kernels read it. Constant (dim, N): as it is, each lane of a block reading
    its own channel's row. Variable or grouped: (batch, G, L, N) in scan order (time flipped
    when ``reverse``), contiguous over the N states (the loops over them vectorise only over
    contiguous memory), a block's lanes sharing its group's rows."""
    if layouts.layout(X) == "constant":
        return _np(X.contiguous())
    X4 = layouts.as_grouped(X.detach()).transpose(2, 3)
    return (X4.flip(2) if reverse else X4).contiguous().numpy()


def _span(B: torch.Tensor, C: torch.Tensor, dim: int) -> int:
    """The largest run of channels that all read one group of B and one of C (a constant B or C,
    read per lane, sets no bound)."""

    def channels_per_group(X: torch.Tensor) -> int:
        if layouts.layout(X) == "constant":
            return dim
        return layouts.channels_per_group(layouts.as_grouped(X), dim)

    return math.gcd(channels_per_group(B), channels_per_group(C))


def _thread_groups(batch: int, dim: int, span: int) -> int:
    """Blocks are split into this many ranges, one per thread (never more than blocks)."""
    return max(1, min(threads.follow_torch(), _block_count(batch, dim, span)))


def _no_gate(like: torch.Tensor) -> np.ndarray:
    """The (1, 1, 0) placeholder for z and dz when there is no gate (the kernels are told so by
    ``has_gate`` and never index it)."""
    return np.zeros((1, 1, 0), dtype=torch.empty(0, dtype=like.dtype).numpy().dtype)


def _kernel_inputs(u, delta, A, B, C, h0, D, z, delta_bias, softplus, reverse) -> tuple:
    """The arguments both kernels start with: u, delta, its bias (zeros when there is none),
    softplus, A, B and C (:func:`_kernel_coefficients`), h0, D (zeros when absent), z (a
    placeholder when absent), has_gate, reverse and the span of channels sharing B and C."""
    batch, dim, length = u.shape
    zeros = torch.zeros(dim, dtype=u.dtype)
    return (
        _np(u),
        _np(delta),
        _np(delta_bias if delta_bias is not None else zeros),
        bool(softplus),
        _np(A),
        _kernel_coefficients(B, reverse),
        _kernel_coefficients(C, reverse),
        _np(h0),
        _np(D if D is not None else zeros),
        _np(z) if z is not None else _no_gate(u),
        z is not None,
        bool(reverse),
        _span(B, C, dim),
    )


def scan_forward(
    u, delta, A, B, C, h0, D=None, z=None, delta_bias=None, softplus=False, reverse=False
):
    """The gated output ``(<C_t, h_t> + D u_t) * silu(z_t)`` (batch, dim, L), the last state
    (batch, dim, N) and the states the backward starts from (:func:`checkpoints_shape`), with
    delta = softplus(delta + delta_bias) when ``softplus``. ``reverse`` scans from the last time
    step to the first (the last state is then the one at t = 0). Inputs are read with their
    strides; every tensor has the dtype of u (float32 or float64)."""
    batch, dim, length = u.shape
    inputs = _kernel_inputs(u, delta, A, B, C, h0, D, z, delta_bias, softplus, reverse)
    y = torch.empty(u.shape, dtype=u.dtype)
    h_last = torch.empty_like(h0)
    checkpoints = torch.empty(checkpoints_shape(batch, dim, length, A.shape[1]), dtype=u.dtype)
    _scan_forward(
        *inputs,
        _thread_groups(batch, dim, inputs[-1]),
        y.numpy(),
        h_last.numpy(),
        checkpoints.numpy(),
    )
    return y, h_last, checkpoints


def checkpoints_shape(batch: int, dim: int, length: int, nstate: int) -> tuple[int, ...]:
    """(batch, dim, chunks, N): the state before every CHUNK-th step of each channel."""
    return (batch, dim, (length + CHUNK - 1) // CHUNK, nstate)


def _partials(X, groups, dtype) -> torch.Tensor:
    """One zeroed gradient buffer of B or C per thread group, in the form the kernels read X
    (:func:`_kernel_coefficients`): (groups, dim, N) for a constant, else (groups, batch, G, L,
    N) in scan order."""
    if layouts.layout(X) == "constant":
        return torch.zeros(groups, *X.shape, dtype=dtype)
    X4 = layouts.as_grouped(X)
    return torch.zeros(groups, X4.shape[0], X4.shape[1], X4.shape[3], X4.shape[2], dtype=dtype)


def _summed(part, like, reverse):
    """Sum of the per-thread partials, back in time order and in the layout of ``like``."""
    total = part.sum(0)
    if layouts.layout(like) == "constant":
        return total
    return (total.flip(2) if reverse else total).transpose(2, 3).reshape(like.shape)


def scan_backward(
    u,
    delta,
    A,
    B,
    C,
    h0,
    checkpoints,
    dy,
    dh_last,
    D=None,
    z=None,
    delta_bias=None,
    softplus=False,
    reverse=False,
):
    """Gradients of :func:`scan_forward`'s first two outputs with respect to u, delta, A, B, C,
    the initial state, D, z and delta_bias (None for those not given), given its checkpoints."""
    batch, dim, length = u.shape
    nstate = A.shape[1]
    inputs = _kernel_inputs(u, delta, A, B, C, h0, D, z, delta_bias, softplus, reverse)
    groups = _thread_groups(batch, dim, inputs[-1])
    du = torch.empty(u.shape, dtype=u.dtype)
    ddelta = torch.empty(u.shape, dtype=u.dtype)
    dz = torch.empty(u.shape, dtype=u.dtype) if z is not None else None
    dA_part = torch.empty(batch, dim, nstate, dtype=u.dtype)
    dD_part = torch.empty(batch, dim, dtype=u.dtype)
    dB_part, dC_part = _partials(B, groups, u.dtype), _partials(C, groups, u.dtype)
    dbias_part = torch.empty(batch, dim, dtype=u.dtype)
    dh0 = torch.empty_like(h0)
    _scan_backward(
        *inputs,
        _np(checkpoints),
        _np(dy),
        _np(dh_last),
        du.numpy(),
        ddelta.numpy(),
        dz.numpy() if dz is not None else _no_gate(u),
        dA_part.numpy(),
        dB_part.numpy(),
        dC_part.numpy(),
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
