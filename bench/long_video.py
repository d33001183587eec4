"""Constant cost per frame: time and state size of streaming generation against the number of
frames already generated, next to the cost of recomputing the whole history (what a model
without carried state must do for each new frame).

    python bench/long_video.py                 # 256 frames, CPU
    python bench/long_video.py --frames 1024 --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import print_table  # noqa: E402

from matten.diffusion import create_diffusion  # noqa: E402
from matten.long_video import iter_long  # noqa: E402
from matten.models import create_causal_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per chunk")
    parser.add_argument("--memory", default="both")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_causal_model(input_size=16, in_channels=3, depth=2, hidden_size=64,
                                num_heads=4, window=4, sink=1, memory=args.memory,
                                context_length=16).to(device).eval()
    diffusion = create_diffusion(str(args.steps), prediction="velocity")
    marks = sorted({m for m in (8, 32, 128, 512, 2048) if m <= args.frames} | {args.frames})

    rows, last = [], time.perf_counter()
    per_frame = {}
    for chunk in iter_long(model, diffusion, args.frames, args.chunk_size, (3, 16, 16),
                           generator=torch.Generator().manual_seed(0), device=device):
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        per_frame[chunk.stop] = (now - last) / (chunk.stop - chunk.start)
        last = now
        if any(chunk.start < m <= chunk.stop for m in marks):
            mark = next(m for m in marks if chunk.start < m <= chunk.stop)
            recent = [v for k, v in per_frame.items() if k > chunk.stop - 8]
            # the whole-history alternative: one forward over every frame so far, per step
            history = torch.randn(1, 3, chunk.stop, 16, 16, device=device)
            t = torch.zeros(1, chunk.stop, dtype=torch.long, device=device)
            with torch.no_grad():
                start = time.perf_counter()
                model(history, t)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                full = (time.perf_counter() - start) * args.steps / args.chunk_size
            rows.append([mark, f"{1e3 * sum(recent) / len(recent):.1f}", f"{1e3 * full:.1f}",
                         chunk.state.num_elements()])
            last = time.perf_counter()
    print(f"streaming generation, Matten-Causal (depth 2, hidden 64, window 4, memory "
          f"{args.memory}), 16x16 frames, chunks of {args.chunk_size}, {args.steps} DDIM steps, "
          f"{device}, torch {torch.__version__}")
    print_table(["frames so far", "streaming ms/frame", "full-history ms/frame",
                 "state elements"], rows)


if __name__ == "__main__":
    main()
