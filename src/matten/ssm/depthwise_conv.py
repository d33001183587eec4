"""The Mamba layer's depthwise conv1d, with a backward written out by hand.

The forward is ``F.conv1d(x, weight, bias, padding, groups=channels)``, bit for bit, so outputs
of checkpoints stay exactly what they were. torch's CPU backward of a depthwise (grouped) conv1d
is far slower than its forward: in a Matten-S training step it took a second a call against
37 ms for the forward, a quarter of the step (bench/RESULTS.md). The conv has d_conv = 4 taps,
so its gradients are four shifted multiplies and sums over (batch, channels, length), which
torch vectorises and threads well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["depthwise_conv1d"]


class _DepthwiseConv1d(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, left: int, right: int) -> Tensor:
        if left == right:  # the call nn.Conv1d(padding=left) makes
            return F.conv1d(x, weight, bias, padding=left, groups=x.shape[1])
        return F.conv1d(F.pad(x, (left, right)), weight, bias, groups=x.shape[1])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, left, right = inputs
        ctx.save_for_backward(x, weight)
        ctx.pads, ctx.has_bias = (left, right), bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        left, right = ctx.pads
        taps, length = weight.shape[-1], grad.shape[-1]
        padded = F.pad(x, (left, right))  # output t = sum_j weight[:, 0, j] * padded[..., t + j]
        w = weight[:, 0]  # (channels, taps)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_padded = padded.new_zeros(padded.shape)
            for j in range(taps):
                grad_padded[..., j : j + length] += grad * w[:, j, None]
            grad_x = grad_padded[..., left : left + x.shape[-1]]
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack(
                [(grad * padded[..., j : j + length]).sum((0, 2)) for j in range(taps)], dim=-1
            )[:, None]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2))
        return grad_x, grad_w, grad_b, None, None


def depthwise_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, padding: tuple[int, int] = (0, 0)
) -> Tensor:
    """Depthwise conv1d of ``x`` (batch, channels, L) with ``weight`` (channels, 1, taps) after
    zero padding ``padding = (left, right)``: equal to ``F.conv1d`` with ``groups=channels``."""
    if weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"weight must have shape (channels={x.shape[1]}, 1, taps), got {tuple(weight.shape)}"
        )
    return _DepthwiseConv1d.apply(x, weight, bias, *padding)
