"""The Mamba layer's depthwise causal conv1d: torch's own conv against Matten's backward.

One (batch, 768, L) conv with 4 taps, padding 3 and the causal crop, as the Mamba layer runs it
(float32). Forward: torch's ``F.conv1d`` for both (Matten keeps it, bit for bit). Backward of a
given output gradient: torch's autograd of ``F.conv1d`` against ``depthwise_conv1d``'s hand-written
one: on CPU the compiled (numba) pass, on CUDA the Triton kernel, and on both the plain torch ops
it falls back to. Best of ``--repeats`` timed calls each, all in one run; on CPU with freed memory
kept for reuse, as in training (:mod:`matten.allocator`).

    python bench/conv.py                  # CPU, batch 16, L 512 (the training step's shape)
    python bench/conv.py --device cuda    # GPU, batch 16 and L 512 and 4096
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import best_time, print_table  # noqa: E402

from matten.allocator import keep_freed_memory  # noqa: E402
from matten.ssm import depthwise_conv  # noqa: E402

DIM, TAPS = 768, 4


def timed(fn, device, repeats):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return best_time(run, repeats=repeats, warmup=2)


def conv_forward(x, w, b):
    """The Mamba layer's causal conv of x (as depthwise_conv1d runs it forward)."""
    return lambda: F.conv1d(x, w, b, padding=TAPS - 1, groups=DIM)[..., : x.shape[-1]]


def backward_methods(x, w, b, grad, device):
    """name -> a call taking the three gradients of the conv for ``grad``."""
    length = x.shape[-1]
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = F.conv1d(leaves[0], leaves[1], leaves[2], padding=TAPS - 1, groups=DIM)[..., :length]
    methods = {
        "torch autograd (F.conv1d)": lambda: torch.autograd.grad(
            out, leaves, grad, retain_graph=True
        ),
        "matten, torch ops": lambda: depthwise_conv._torch_backward(
            x, w, grad, TAPS - 1, TAPS - 1, 0, length
        ),
    }
    if device.type == "cpu":
        methods["matten, compiled (numba)"] = lambda: depthwise_conv._compiled_backward(
            x, w, grad, TAPS - 1, 0
        )
    elif depthwise_conv._triton_conv() is not None:
        methods["matten, Triton"] = lambda: depthwise_conv._triton_conv().conv_backward(
            x, w, grad, TAPS - 1, 0
        )
    else:
        print("Triton kernel not timed: triton does not import or compile for CUDA here")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()  # as `matten train` does: no page faults on every new tensor
    lengths = args.lengths or ([512] if device.type == "cpu" else [512, 4096])
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    for length in lengths:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, DIM, length, generator=g).to(device)
        w = torch.randn(DIM, 1, TAPS, generator=g).to(device)
        b = torch.randn(DIM, generator=g).to(device)
        grad = torch.randn(args.batch, DIM, length, generator=g).to(device)
        forward = timed(conv_forward(x, w, b), device, args.repeats)
        methods = backward_methods(x, w, b, grad, device)
        reference = methods["torch autograd (F.conv1d)"]()
        rows = []
        for name, fn in methods.items():
            for got, want in zip(fn(), reference, strict=True):  # same gradients first
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
            seconds = timed(fn, device, args.repeats)
            rows.append([name, f"{seconds * 1e3:.2f}", f"{seconds / forward:.2f}x"])
        print(
            f"\ndepthwise conv1d backward, batch {args.batch} x {DIM} x {length}, {TAPS} taps, "
            f"float32, {where}; torch's forward {forward * 1e3:.2f} ms"
        )
        print_table(["backward", "ms", "vs the forward"], rows)


if __name__ == "__main__":
    main()
