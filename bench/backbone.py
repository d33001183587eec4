"""Backbone forward+backward time and peak memory: Matten-S/2 variants vs the Latte-S/2 baseline.

Batch 1, 32x32x4 latents (16x16 patches per frame) at 16, 32 and 64 frames (4096, 8192 and 16384
tokens), unconditional, float32, one warm-up step then the best of ``--repeats`` timed steps.
Ratios are to Latte-S/2 at the same frame count; "growth" is the time at F frames over the time
at 16 frames (linear growth = F/16).

    python bench/backbone.py                      # CPU
    python bench/backbone.py --device cuda        # GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import print_table, reexec_with_returning_malloc, sampled_peak  # noqa: E402

from matten.models import create_model  # noqa: E402

MODELS = [
    ("Latte-S/2", 3),
    ("Matten-S/2", 1),
    ("Matten-S/2", 2),
    ("Matten-S/2", 3),
    ("Matten-S/2", 4),
]


def peak_during(fn, device):
    """Run fn once; return (seconds, peak extra MB) — CUDA allocator peak, or sampled RSS on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**20
    return sampled_peak(fn)


def step(model, frames, device):
    x = torch.randn(1, 4, frames, 32, 32, device=device)
    t = torch.randint(0, 1000, (1,), device=device)

    def run():
        model.zero_grad(set_to_none=True)
        model(x, t).square().mean().backward()

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.device == "cpu":
        reexec_with_returning_malloc()
    results = {}
    for name, variant in MODELS:
        torch.manual_seed(0)
        model = create_model(name, variant=variant, in_channels=4).to(args.device)
        label = "Latte-S/2" if name.startswith("Latte") else f"Matten-S/2 v{variant}"
        step(model, 2, args.device)()  # warm-up: kernels compiled, allocator primed
        for frames in args.frames:
            runs = [
                peak_during(step(model, frames, args.device), args.device)
                for _ in range(args.repeats)
            ]
            results[label, frames] = (min(r[0] for r in runs), max(r[1] for r in runs))
            print(
                f"{label:16s} {frames:3d} frames: {results[label, frames][0]:.2f} s, "
                f"{results[label, frames][1]:.0f} MB",
                flush=True,
            )
        del model
    where = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"\nforward+backward, batch 1, 32x32x4 latents, float32, {where}")
    rows = []
    for label in dict.fromkeys(k[0] for k in results):
        for frames in args.frames:
            sec, mb = results[label, frames]
            base_sec, base_mb = results["Latte-S/2", frames]
            first = results[label, args.frames[0]][0]
            rows.append(
                [
                    label,
                    frames,
                    frames * 256,
                    f"{sec:.2f}",
                    f"{sec / base_sec:.2f}",
                    f"{sec / first:.2f} (linear {frames / args.frames[0]:.0f})",
                    f"{mb:.0f}",
                    f"{mb / base_mb:.2f}",
                ]
            )
    print_table(
        [
            "model",
            "frames",
            "tokens",
            "fwd+bwd s",
            "time vs Latte",
            "growth vs first",
            "peak extra MB",
            "memory vs Latte",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
