"""``selective_scan``: Mamba's S6 scan with the call signature of ``mamba_ssm``'s
``selective_scan_fn``.

Backends, chosen per call from the device of ``u`` (see :func:`backend`):

  * ``"mamba_ssm"``: that package's fused CUDA kernel, when it imports (CUDA only, and not for
    calls with an ``initial_state``, which it does not take);
  * ``"triton"``: the Triton kernels of :mod:`matten.ssm.triton_scan` (CUDA; CPU tensors through
    Triton's interpreter when ``TRITON_INTERPRET=1`` is set before triton is first imported);
  * ``"chunked"``: :func:`matten.ssm.chunked_scan.chunked_scan`, plain PyTorch on any device;
  * ``"cpu"``: the compiled kernels of :mod:`matten.ssm.cpu_kernel`, with a hand-written
    backward, registered as the operators ``matten::scan_fwd`` / ``matten::scan_bwd`` (CPU and the
    meta device);
  * ``"reference"``: the float64 loop of :mod:`matten.ssm.reference` (slow; for checking).

Automatic order: on CUDA mamba_ssm, then triton, then chunked; on CPU (and meta) cpu; on any other
device chunked. ``MATTEN_SCAN_BACKEND`` (auto|mamba_ssm|triton|chunked|cpu|reference) or the
``backend=`` argument of :func:`selective_scan` names one instead; naming one that cannot run
the call raises an error that says why.

Discretisation follows Mamba: A_bar = exp(delta * A) (zero-order hold) and B_bar * u = delta * B * u
(the first-order simplification of the paper's Eq. 3 that Mamba's kernels use).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import cpu_kernel, layouts
from .chunked_scan import chunked_scan
from .reference import selective_scan_ref

BACKENDS = ("auto", "mamba_ssm", "triton", "chunked", "cpu", "reference")
ENV_VAR = "MATTEN_SCAN_BACKEND"
_AUTO_ORDER = {"cuda": ("mamba_ssm", "triton", "chunked"), "cpu": ("cpu",), "meta": ("cpu",)}


@functools.lru_cache(maxsize=1)
def mamba_ssm_scan():
    """``mamba_ssm``'s ``selective_scan_fn`` if that package imports, else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a build that fails to load its CUDA library
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=1)
def triton_scan_module():
    """:mod:`matten.ssm.triton_scan` if triton imports, else None (imported on first use)."""
    try:
        from . import triton_scan
    except Exception:  # no triton, or one that fails to load
        return None
    return triton_scan


def _unavailable(name: str, device: torch.device, initial_state: bool) -> str | None:
    """Why backend ``name`` cannot run a call on ``device``, or None when it can."""
    if name == "mamba_ssm":
        if device.type != "cuda":
            return "runs CUDA tensors only"
        if mamba_ssm_scan() is None:
            return "is not available: mamba_ssm is not installed or does not import"
        if initial_state:
            return "takes no initial_state"
    elif name == "triton":
        module = triton_scan_module()
        if module is None:
            return "is not available: triton is not installed or does not import"
        if not module.runs_on(device):
            if device.type == "cpu":
                return (
                    "runs CPU tensors only through Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before triton is first imported (importing matten "
                    "imports it)"
                )
            return f"cannot run {device.type} tensors here (CUDA needed" + (
                ", and Triton is in interpreter mode)" if module.INTERPRETED else ")"
            )
    elif name == "cpu" and device.type not in ("cpu", "meta"):
        return "runs CPU (and meta) tensors only"
    return None


def backend(
    device: str | torch.device | None = None,
    *,
    override: str | None = None,
    initial_state: bool = False,
) -> str:
    """The backend :func:`selective_scan` uses for tensors on ``device`` (default: CUDA when there
    is one, else CPU): "mamba_ssm", "triton", "chunked", "cpu" or "reference".

    ``override`` (default: the ``MATTEN_SCAN_BACKEND`` environment variable, else "auto") names
    one; an unknown or unavailable name raises. ``initial_state``: for a call that passes one.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    requested = (override or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if requested not in BACKENDS:
        raise ValueError(
            f"selective_scan: unknown backend {requested!r} "
            f"(from {'backend=' if override else ENV_VAR}); choose one of {BACKENDS}"
        )
    if requested != "auto":
        why = _unavailable(requested, device, initial_state)
        if why:
            raise RuntimeError(f"selective_scan: backend {requested!r} {why}")
        return requested
    for name in _AUTO_ORDER.get(device.type, ("chunked",)):
        if _unavailable(name, device, initial_state) is None:
            return name
    return "chunked"


_choose = backend  # selective_scan's ``backend`` argument shadows the function's name there


# The CPU kernels are registered as PyTorch operators so that autograd, the meta device (shape
# inference, parameter and FLOP counting without memory) and FlopCounterMode all see them. They
# take delta's bias and softplus, D, the gate z and the scan direction themselves, so that none
# of those becomes a separate tensor op (and a saved tensor) of the autograd graph.
@torch.library.custom_op("matten::scan_fwd", mutates_args=(), device_types="cpu")
def _scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    h0: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    softplus: bool,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    # The third output: the states the backward recomputes the others from.
    return cpu_kernel.scan_forward(u, delta, A, B, C, h0, D, z, delta_bias, softplus, reverse)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, h0, D, z, delta_bias, softplus, reverse):
    batch, dim, length = u.shape
    checkpoints = u.new_empty(cpu_kernel.checkpoints_shape(batch, dim, length, A.shape[1]))
    return u.new_empty(u.shape), torch.empty_like(h0), checkpoints


@torch.library.custom_op("matten::scan_bwd", mutates_args=(), device_types="cpu")
def _scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    h0: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    softplus: bool,
    reverse: bool,
    checkpoints: Tensor,
    dy: Tensor,
    dh_last: Tensor,
) -> list[Tensor]:
    # An operator returns tensors only: the gradients of absent D / z / delta_bias are empty.
    grads = cpu_kernel.scan_backward(
        u, delta, A, B, C, h0, checkpoints, dy, dh_last, D, z, delta_bias, softplus, reverse
    )
    return [u.new_empty(0) if g is None else g for g in grads]


@_scan_bwd.register_fake
def _(u, delta, A, B, C, h0, D, z, delta_bias, softplus, reverse, checkpoints, dy, dh_last):
    return [
        u.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in (u, delta, A, B, C, h0, D, z, delta_bias)
    ]


def _setup_context(ctx, inputs, output):
    *tensors, softplus, reverse = inputs
    ctx.flags = (softplus, reverse)
    ctx.present = [t is not None for t in tensors]
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(*tensors, output[2])


def _backward(ctx, dy, dh_last, _):
    u, delta, A, B, C, h0, D, z, delta_bias, checkpoints = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy
    dh_last = torch.zeros_like(h0) if dh_last is None else dh_last.contiguous()
    grads = _scan_bwd(u, delta, A, B, C, h0, D, z, delta_bias, *ctx.flags, checkpoints, dy, dh_last)
    return (
        *(g if present else None for g, present in zip(grads, ctx.present, strict=True)),
        None,
        None,
    )


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


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Raise an error naming the first argument of the wrong type, dtype, device or shape."""
    tensors = {
        "u": u,
        "delta": delta,
        "A": A,
        "B": B,
        "C": C,
        "D": D,
        "z": z,
        "delta_bias": delta_bias,
        "initial_state": initial_state,
    }
    for name, t in tensors.items():
        if t is None:
            if name in ("u", "delta", "A", "B", "C"):
                raise TypeError(f"selective_scan: {name} is required")
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"selective_scan: {name} must be a tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(
                f"selective_scan: complex {name} is not supported (dtype {t.dtype}); "
                "only real-valued scans are implemented"
            )
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"selective_scan: {name} must be float16, bfloat16, float32 or "
                f"float64, got {t.dtype}"
            )
        if t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(
            f"selective_scan: A must have shape (dim, N) = ({u.shape[1]}, N) for u of "
            f"shape {tuple(u.shape)}, got {tuple(A.shape)}"
        )
    batch, dim, length = u.shape
    nstate = A.shape[1]
    expected = {
        "delta": (batch, dim, length),
        "D": (dim,),
        "z": (batch, dim, length),
        "delta_bias": (dim,),
        "initial_state": (batch, dim, nstate),
    }
    for name, shape in expected.items():
        t = tensors[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} must have shape {shape} for u of shape "
                f"{tuple(u.shape)} and A of shape {tuple(A.shape)}, got {tuple(t.shape)}"
            )
    layouts.check("B", B, batch, dim, length, nstate)
    layouts.check("C", C, batch, dim, length, nstate)


def selective_scan(
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
    *,
    backend=None,
    reverse=False,
):
    """Selective scan ``y_t = <C_t, h_t> + D u_t`` with ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t
    u_t``.

    Layouts as in ``mamba_ssm``: u, delta, z: (batch, dim, L); A: (dim, N), real; D, delta_bias:
    (dim,). B and C each: (batch, N, L) (shared by all channels), (batch, G, N, L) (channel d
    uses group d // (dim // G)) or (dim, N) (constant in time); see :mod:`matten.ssm.layouts`.
    ``delta_bias`` is added and ``softplus`` applied to delta first; the output is gated by
    ``silu(z)``. ``initial_state`` (batch, dim, N) starts the recurrence from a carried state (used
    for streaming); ``return_last_state`` also returns the final state. ``backend`` names the
    implementation (see :func:`backend`; default: ``MATTEN_SCAN_BACKEND``, else automatic).
    ``reverse`` (not in mamba_ssm) scans from the last time step to the first, as a scan of the
    flipped sequence flipped back would, but without the flips on the CPU backend; the last
    state is then the state after t = 0, and ``initial_state`` the state before t = L - 1.
    The output has u's dtype; arithmetic is float32 (float64 for float64 u).
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    name = _choose(u.device, override=backend, initial_state=initial_state is not None)
    if reverse and name != "cpu":  # the others scan forwards: run the reversed sequence
        fu, fdelta, fA, fB, fC, fD, fz = (_flip_time(t) for t in (u, delta, A, B, C, D, z))
        y = selective_scan(
            fu,
            fdelta,
            fA,
            fB,
            fC,
            fD,
            fz,
            delta_bias,
            delta_softplus,
            return_last_state,
            initial_state,
            backend=name,
        )
        return (y[0].flip(-1), y[1]) if return_last_state else y.flip(-1)
    if name == "mamba_ssm":  # its own function, arguments unchanged
        return mamba_ssm_scan()(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    if name == "reference":
        return selective_scan_ref(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state
        )
    if name == "triton":  # fused: delta_bias, softplus, D and z inside the kernels
        y, h_last = triton_scan_module().selective_scan_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
        )
        return (y, h_last.to(u.dtype)) if return_last_state else y

    if name == "cpu":  # fused: delta_bias, softplus, D, z and the direction in the kernels
        compute = torch.float64 if u.dtype == torch.float64 else torch.float32
        cast = lambda t: None if t is None else t.to(compute)  # no copy when already compute
        h0 = (
            u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=compute)
            if initial_state is None
            else cast(initial_state)
        )
        y, h_last, _ = _scan_fwd(
            cast(u),
            cast(delta),
            cast(A),
            cast(B),
            cast(C),
            h0,
            cast(D),
            cast(z),
            cast(delta_bias),
            bool(delta_softplus),
            reverse,
        )
        y = y.to(u.dtype)
        return (y, h_last.to(u.dtype)) if return_last_state else y

    out_dtype = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u32, delta, A32, B32, C32 = (t.to(compute).contiguous() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h0 = (
        u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])
        if initial_state is None
        else initial_state.to(compute)
    )
    y, h_last = chunked_scan(u32, delta, A32, B32, C32, h0)
    if D is not None:
        y = y + u32 * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    y = y.to(out_dtype)
    return (y, h_last.to(out_dtype)) if return_last_state else y


def _flip_time(t: Tensor | None) -> Tensor | None:
    """``t`` reversed along time: the last axis of (batch, dim, L), (batch, N, L) and
    (batch, G, N, L) tensors; A (dim, N), D and constant B/C (dim, N) have none."""
    return t.flip(-1) if t is not None and t.dim() >= 3 else t
