"""The Mamba layer's depthwise conv1d, with a backward written out by hand.

The forward is ``F.conv1d(x, weight, bias, padding, groups=channels)``, bit for bit, so outputs
of checkpoints stay exactly what they were. torch's CPU backward of a depthwise (grouped) conv1d
is far slower than its forward: in a Matten-S training step it took a second a call against
37 ms for the forward, a quarter of the step (bench/RESULTS.md). The conv has d_conv = 4 taps,
so its gradients are four shifted multiplies and sums over (batch, channels, length). On CPU one
compiled (numba) pass per channel computes all three gradients, reading the input and the output
gradient with their strides into zero-padded rows whose loops vectorise; on CUDA one Triton
kernel does (:mod:`matten.ssm.triton_conv`) when triton imports, else they are torch ops.

``crop`` keeps part of the output (the causal conv keeps the first L of the L + 3 outputs that
``padding=3`` gives): done inside, the backward never sees the zeros of the cropped positions.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import threads
from .cpu_kernel import PARALLEL_JIT

__all__ = ["depthwise_conv1d"]


@numba.jit(**PARALLEL_JIT)  # the scan kernels' options: reassociation vectorises the tap sums
def _conv_backward(x, grad, w, left, start, grad_x, grad_w, grad_b):
    # Output o of the crop is position start + o of the padded conv, whose value is
    # sum_j w[c, j] * x[c, o + j - shift] with shift = left - start (zero outside x). Each row of
    # x and of grad is first copied with zeros around it (padded_x, padded_grad), so that every
    # tap's loop runs over the whole row without bounds checks and vectorises.
    batch, channels, length = x.shape
    kept, taps = grad.shape[2], w.shape[1]
    shift = left - start
    dtype = x.dtype
    for c in numba.prange(channels):
        padded_x = np.empty(kept + taps - 1, dtype=dtype)  # [q] = x[q - shift]
        padded_grad = np.empty(length + taps - 1, dtype=dtype)  # [q] = grad[q + shift - taps + 1]
        acc_w = np.zeros(taps)  # float64: a sum over batch x length terms
        acc_b = 0.0
        for b in range(batch):
            for q in range(kept + taps - 1):
                i = q - shift
                padded_x[q] = x[b, c, i] if 0 <= i < length else 0.0
            for q in range(length + taps - 1):
                o = q + shift - taps + 1
                padded_grad[q] = grad[b, c, o] if 0 <= o < kept else 0.0
            # grad_x[i] = sum_j w[j] grad[i + shift - j]
            row = grad_x[b, c]
            row[:] = 0.0
            for j in range(taps):
                w_j = w[c, j]
                offset = taps - 1 - j
                for i in range(length):
                    row[i] += w_j * padded_grad[i + offset]
            # grad_w[j] = sum_o grad[o] x[o + j - shift]
            for j in range(taps):
                total = dtype.type(0.0)
                for o in range(kept):
                    total += grad[b, c, o] * padded_x[o + j]
                acc_w[j] += total
            total = dtype.type(0.0)
            for o in range(kept):
                total += grad[b, c, o]
            acc_b += total
        for j in range(taps):
            grad_w[c, 0, j] = acc_w[j]
        grad_b[c] = acc_b


def _compiled_backward(x, weight, grad, left, start):
    threads.follow_torch()
    grad_x = torch.empty(x.shape, dtype=x.dtype)
    grad_w = torch.empty(weight.shape, dtype=weight.dtype)
    grad_b = torch.empty(weight.shape[0], dtype=weight.dtype)
    _conv_backward(
        x.detach().numpy(),
        grad.detach().numpy(),
        weight.detach()[:, 0].numpy(),
        left,
        start,
        grad_x.numpy(),
        grad_w.numpy(),
        grad_b.numpy(),
    )
    return grad_x, grad_w, grad_b


def _torch_backward(x, weight, grad, left, right, start, stop):
    taps = weight.shape[-1]
    padded = F.pad(x, (left, right))  # full output t = sum_j weight[:, 0, j] * padded[..., t + j]
    full = padded.shape[-1] - taps + 1
    grad = F.pad(grad, (start, full - stop))  # the cropped outputs had no gradient
    w = weight[:, 0]  # (channels, taps)
    grad_padded = padded.new_zeros(padded.shape)
    for j in range(taps):
        grad_padded[..., j : j + full] += grad * w[:, j, None]
    grad_x = grad_padded[..., left : left + x.shape[-1]]
    grad_w = torch.stack(
        [(grad * padded[..., j : j + full]).sum((0, 2)) for j in range(taps)], dim=-1
    )[:, None]
    return grad_x, grad_w, grad.sum((0, 2))


@functools.lru_cache(maxsize=1)
def _triton_conv():
    """:mod:`matten.ssm.triton_conv` if triton imports and compiles for CUDA here, else None."""
    try:
        from . import triton_conv
    except Exception:  # no triton, or one that fails to load
        return None
    return None if triton_conv.INTERPRETED else triton_conv


def _has_no_negative_strides(t: Tensor) -> bool:
    return all(s >= 0 for s in t.stride())


class _DepthwiseConv1d(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, left, right, start, stop):
        if left == right:  # the call nn.Conv1d(padding=left) makes
            out = F.conv1d(x, weight, bias, padding=left, groups=x.shape[1])
        else:
            out = F.conv1d(F.pad(x, (left, right)), weight, bias, groups=x.shape[1])
        return out[..., start:stop]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, left, right, start, stop = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.has_bias = (left, right, start, stop), bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        left, right, start, stop = ctx.geometry
        compiled = (
            x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype == grad.dtype
            and _has_no_negative_strides(x)
            and _has_no_negative_strides(grad)
        )
        if compiled:
            grad_x, grad_w, grad_b = _compiled_backward(x, weight, grad, left, start)
        elif x.is_cuda and _triton_conv() is not None:
            grad_x, grad_w, grad_b = _triton_conv().conv_backward(x, weight, grad, left, start)
        else:
            grad_x, grad_w, grad_b = _torch_backward(x, weight, grad, left, right, start, stop)
        return (
            grad_x if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None,
            grad_b if ctx.has_bias and ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def depthwise_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: tuple[int, int] = (0, 0),
    crop: tuple[int, int | None] = (0, None),
) -> Tensor:
    """Depthwise conv1d of ``x`` (batch, channels, L) with ``weight`` (channels, 1, taps) after
    zero padding ``padding = (left, right)``, outputs ``crop = (start, stop)`` of it: equal to
    ``F.conv1d`` with ``groups=channels``, sliced ``[..., start:stop]``."""
    if weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (channels={x.shape[1]}, 1, taps), got {tuple(weight.shape)}"
        )
    full = x.shape[-1] + padding[0] + padding[1] - weight.shape[-1] + 1
    start, stop = range(full)[slice(*crop)].start, range(full)[slice(*crop)].stop
    return _DepthwiseConv1d.apply(x, weight, bias, *padding, start, stop)
