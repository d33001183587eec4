"""The backward of the Mamba layer's depthwise conv1d as one Triton kernel (CUDA).

:func:`matten.ssm.depthwise_conv.depthwise_conv1d` keeps torch's ``F.conv1d`` forward (bit for
bit, so outputs stay what checkpoints were made with); its backward, written out by hand, takes
the gradients of the input, the weight and the bias. As torch ops that is a padded copy, one
multiply-add per tap for the input's gradient and one product and sum per tap for the weight's:
a dozen passes over (batch, channels, L). Here one program per (batch element, channel) reads its
row of the input and of the output gradient once, block by block, writes the input's gradient
and keeps the weight's and the bias's partial sums in registers; those partials, per batch
element, are summed over the batch by torch (deterministic, no atomics). Arithmetic is float32
(float64 for float64 inputs).

With ``TRITON_INTERPRET=1`` set before triton is first imported, Triton's interpreter runs the
kernel on CPU tensors (tests/test_triton_scan.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_bwd_kernel(
    x_ptr,
    grad_ptr,
    w_ptr,
    grad_x_ptr,
    part_w_ptr,
    part_b_ptr,
    channels,
    length,
    kept,
    span,
    shift,
    sx_b,
    sx_c,
    sx_l,
    sg_b,
    sg_c,
    sg_l,
    TAPS: tl.constexpr,
    BLOCK: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    # Output o of the crop is sum_j w[c, j] x[o + j - shift] (zero outside x), so
    # grad_x[i] = sum_j w[c, j] grad[i + shift - j], grad_w[c, j] = sum_o grad[o] x[o + j - shift].
    row = tl.program_id(0)
    b = row // channels
    c = row % channels
    x_row = x_ptr + b * sx_b + c * sx_c
    g_row = grad_ptr + b * sg_b + c * sg_c
    taps = tl.arange(0, TAPS)
    w = tl.load(w_ptr + c * TAPS + taps).to(COMPUTE)
    acc_w = tl.zeros([TAPS], dtype=COMPUTE)
    acc_b = tl.zeros([BLOCK], dtype=COMPUTE)
    for start in range(0, span, BLOCK):  # span = max(length, kept)
        offs = start + tl.arange(0, BLOCK)
        # the input's gradient at positions offs: a (BLOCK, TAPS) tile of the output gradient
        o = offs[:, None] + shift - taps[None, :]
        g = tl.load(g_row + o * sg_l, mask=(o >= 0) & (o < kept), other=0.0).to(COMPUTE)
        grad_x = tl.sum(g * w[None, :], axis=1)
        tl.store(grad_x_ptr + row * length + offs, grad_x, mask=offs < length)
        # the weight's and the bias's sums over the outputs at offs
        g_o = tl.load(g_row + offs * sg_l, mask=offs < kept, other=0.0).to(COMPUTE)
        i = offs[:, None] + taps[None, :] - shift
        xs = tl.load(x_row + i * sx_l, mask=(i >= 0) & (i < length), other=0.0).to(COMPUTE)
        acc_w += tl.sum(g_o[:, None] * xs, axis=0)
        acc_b += g_o
    tl.store(part_w_ptr + row * TAPS + taps, acc_w)
    tl.store(part_b_ptr + row, tl.sum(acc_b, axis=0))


#: True when the kernel runs through Triton's interpreter (CPU tensors), decided at import.
INTERPRETED = type(_conv_bwd_kernel).__name__ == "InterpretedFunction"


def conv_backward(
    x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, left: int, start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the input, weight (channels, 1, taps) and bias of the depthwise conv whose
    cropped output ``grad`` is the gradient of: output o is position ``start + o`` of the conv
    of ``x`` padded by ``left`` zeros on the left (the geometry of ``depthwise_conv1d``)."""
    batch, channels, length = x.shape
    taps = weight.shape[-1]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    compute_tl = tl.float64 if compute == torch.float64 else tl.float32
    padded_taps = triton.next_power_of_2(taps)
    w = torch.zeros(channels, padded_taps, dtype=compute, device=x.device)
    w[:, :taps] = weight[:, 0].to(compute)  # taps beyond the kernel's weigh nothing
    grad_x = torch.empty(batch, channels, length, dtype=compute, device=x.device)
    part_w = torch.empty(batch, channels, padded_taps, dtype=compute, device=x.device)
    part_b = torch.empty(batch, channels, dtype=compute, device=x.device)
    block = min(1024, max(16, triton.next_power_of_2(max(length, grad.shape[-1]))))
    _conv_bwd_kernel[(batch * channels,)](
        x,
        grad,
        w,
        grad_x,
        part_w,
        part_b,
        channels,
        length,
        grad.shape[-1],
        max(length, grad.shape[-1]),
        left - start,
        *x.stride(),
        *grad.stride(),
        TAPS=padded_taps,
        BLOCK=block,
        COMPUTE=compute_tl,
    )
    grad_w = part_w.sum(0)[:, None, :taps].to(weight.dtype)
    return grad_x.to(x.dtype), grad_w, part_b.sum(0).to(weight.dtype)
