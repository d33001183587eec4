"""Constant cost per frame: time and peak memory of streaming generation at frame 10, 100 and 1000,
for the hybrid-memory model and the MALT memories against a causal full-attention baseline, in
one run.

All are Matten-Causal with the same blocks (``configs/long.yaml``'s size). The hybrid keeps a
sliding window of 4 frames and compresses what leaves it into its SSM and delta-rule memories;
``malt`` keeps the same window and a fixed set of 16 memory vectors per layer, written every 4
frames (``malt+delta`` adds the delta-rule memory); the baseline attends to every earlier frame,
so its KV cache grows by one frame per frame.
Frames are generated one at a time (chunks of 1, a few DDIM steps each); the time of frame m is
the median over frames m - 2 .. m + 2, its memory the peak while they were made over what the
process held before generation began (on CPU the resident set, sampled every millisecond; on
CUDA the allocator's peak).

    python bench/long.py                       # CPU: frames 10, 100, 1000
    python bench/long.py --device cuda
    python bench/long.py --models malt malt+delta --marks 3 10 30   # some rows, a quick check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import current_rss_bytes, print_table, reexec_with_returning_malloc  # noqa: E402

from matten.diffusion import create_diffusion  # noqa: E402
from matten.models import create_causal_model  # noqa: E402
from matten.pipelines import iter_long  # noqa: E402

SIZE, CHANNELS = 16, 3
# --models key: (row name, the model's causal options); the baseline's window is set per run
MODELS = {
    "hybrid": ("hybrid (window 4, memory both)", dict(window=4, sink=0, memory="both")),
    "malt": ("malt (window 4, 16 slots)", dict(window=4, sink=0, memory="malt")),
    "malt+delta": ("malt+delta (window 4, 16 slots)", dict(window=4, sink=0, memory="malt+delta")),
    "baseline": ("baseline (full causal attention)", dict(sink=0, memory="none")),
}


class PeakMemory:
    """The peak memory in use since the last :meth:`take`, over a fixed base."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.base = self._now()
        self.peak = self.base
        self._done = threading.Event()
        if not self.cuda:  # the CUDA allocator tracks its own peak
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _now(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else current_rss_bytes()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(0.001)

    def take(self) -> float:
        """MiB above the base at the peak since the last call; starts a new period."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            peak, self.peak = max(self.peak, current_rss_bytes()), current_rss_bytes()
        return (peak - self.base) / 2**20

    def close(self) -> None:
        self._done.set()


def measure(model, diffusion, marks: list[int], device: torch.device) -> dict[int, tuple]:
    """Generate max(marks) + 3 frames one by one -> {mark: (median s/frame, peak MiB, state)}."""
    frames = max(marks) + 3
    around = {m: set(range(max(1, m - 2), m + 3)) for m in marks}  # 1-based frame numbers
    times: dict[int, float] = {}
    peaks: dict[int, float] = {}
    states: dict[int, int] = {}
    memory = PeakMemory(device)
    last = time.perf_counter()
    for chunk in iter_long(
        model,
        diffusion,
        frames,
        1,
        (CHANNELS, SIZE, SIZE),
        generator=torch.Generator().manual_seed(0),
        device=device,
    ):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        frame = chunk.stop
        if any(frame in near for near in around.values()):
            times[frame], peaks[frame] = now - last, memory.take()
            states[frame] = chunk.state.num_elements()
        else:
            memory.take()
        last = time.perf_counter()
    memory.close()
    return {
        m: (
            statistics.median(times[f] for f in around[m]),
            max(peaks[f] for f in around[m]),
            states[m],
        )
        for m in marks
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--marks", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per frame")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(MODELS),
        help="rows to measure (default: all)",
    )
    args = parser.parse_args()
    if sorted(args.marks) != args.marks or args.marks[0] < 3:
        parser.error("--marks must be increasing frame numbers >= 3")
    reexec_with_returning_malloc()

    device = torch.device(args.device)
    diffusion = create_diffusion(str(args.steps), prediction="velocity")
    horizon = max(args.marks) + 3
    models = {MODELS[key][0]: {"window": horizon, **MODELS[key][1]} for key in args.models}
    results = {}
    for name, kind in models.items():
        torch.manual_seed(0)
        model = create_causal_model(
            input_size=SIZE,
            in_channels=CHANNELS,
            depth=2,
            hidden_size=64,
            num_heads=4,
            context_length=16,
            **kind,
        )
        model = model.to(device).eval()
        measure(model, diffusion, [3], device)  # warm-up: JIT compilation, caches
        results[name] = measure(model, diffusion, args.marks, device)
        del model

    print(
        f"streaming generation, Matten-Causal (depth 2, hidden 64), {SIZE}x{SIZE} frames, one "
        f"frame per chunk, {args.steps} DDIM steps, {device}, torch {torch.__version__}"
    )
    rows = [
        [name, m, f"{1e3 * sec:.1f}", f"{peak:.1f}", state]
        for name, by_mark in results.items()
        for m, (sec, peak, state) in by_mark.items()
    ]
    print_table(["model", "frame", "ms/frame", "peak MiB", "state elements"], rows)
    first, last = args.marks[0], args.marks[-1]
    print(
        f"per-frame time ratio frame{last}/frame{first}: "
        + ", ".join(
            f"{name.split(' (')[0]} {by_mark[last][0] / by_mark[first][0]:.2f}"
            for name, by_mark in results.items()
        )
    )


if __name__ == "__main__":
    main()
