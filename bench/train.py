"""Training-step speed, peak memory and hardware utilisation: Matten-S/2 variant 3 vs Latte-S/2.

One training step = the diffusion loss (L_simple + L_vlb) of a batch, backward, AdamW step, at the
demo config's data shape (pixel space, its frames, resolution and batch) with the full S size
(paper Table 3: Matten-S variant 3 = 6 blocks of [spatial attn, temporal attn, global Mamba],
Latte-S = 6 blocks of [spatial attn, temporal attn], hidden 384, 6 heads).

Achieved FLOP/s = FLOPs of a step / step time, where the FLOPs of a step are 3x the forward's as
counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention and the
selective scan's registered formula); it is reported as a fraction of the FLOP/s of a large
float32 matmul measured in the same run. Peak memory: growth of resident memory during one step
in a fresh process (CPU) or the CUDA allocator's peak (GPU). The models' steps are timed in
turns, one step of each per round (``--repeats`` rounds), and each model's best step is reported,
with the ratio of every round's pair (the order alternating from round to round).

    python bench/train.py                  # CPU
    python bench/train.py --device cuda    # GPU
    python bench/train.py --batch-size 4 --frames 16 --resolution 32
    python bench/train.py --profile 25     # then one profiled step of each: its top 25 ops

With ``--profile`` (CPU) it also prints how long the selective scan's own operators took in the
profiled step, and the share of the matmul FLOP/s the step would reach without that time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# isort: off
import matten  # noqa: F401  (before torch, as the matten command: its thread defaults)
import torch
from torch.utils.flop_counter import FlopCounterMode

# isort: on

sys.path.insert(0, os.path.dirname(__file__))
from _common import MALLOC_ENV, best_time, print_table, sampled_peak  # noqa: E402

from matten.allocator import keep_freed_memory  # noqa: E402
from matten.config import load_config  # noqa: E402
from matten.diffusion import create_diffusion  # noqa: E402
from matten.models import create_model  # noqa: E402

MODELS = [("Matten-S/2", 3), ("Latte-S/2", None)]


def build(name, variant, frames, resolution, num_classes, device):
    torch.manual_seed(0)
    kwargs = dict(num_frames=frames, input_size=resolution, in_channels=3, num_classes=num_classes)
    if variant is not None:
        kwargs["variant"] = variant
    return create_model(name, **kwargs).to(device)


def make_step(model, batch, frames, resolution, num_classes, device):
    diffusion = create_diffusion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, frames, resolution, resolution, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    kwargs = {"y": (torch.arange(batch) % num_classes).to(device)} if num_classes else None

    def step():
        loss = diffusion.training_losses(model, x, t, model_kwargs=kwargs)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward():
        model(x, t, **(kwargs or {}))

    return step, forward


def step_flops(forward) -> int:
    with FlopCounterMode(display=False) as counter:
        forward()
    return 3 * counter.get_total_flops()


def profile_step(step, device, rows: int) -> dict[str, float]:
    """One step under torch.profiler: its top ``rows`` operators by own time, printed; returns
    each operator's own time in seconds (CPU time, or CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
    averages = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(averages.table(sort_by=key, row_limit=rows))
    return {e.key: getattr(e, key) / 1e6 for e in averages}


def scan_seconds(own_times: dict[str, float]) -> float:
    """The selective scan's share of a profiled step: its operators (matten::scan_fwd and
    scan_bwd) and the autograd node that runs the forward (GeneratedBackwardFor_matten_scan_*)."""
    return sum(
        t for name, t in own_times.items() if "matten::scan" in name or "matten_scan" in name
    )


def matmul_flops_per_second(device, n: int) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def mm():
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / best_time(mm, repeats=5, warmup=2)


def child_peak(args) -> None:
    """--peak-memory NAME: one warm-up step, then the resident-memory growth of a second."""
    device = torch.device("cpu")
    name, variant = next(m for m in MODELS if m[0] == args.peak_memory)
    model = build(name, variant, args.frames, args.resolution, args.num_classes, device)
    step, _ = make_step(
        model, args.batch_size, args.frames, args.resolution, args.num_classes, device
    )
    step()
    print(json.dumps({"peak_mb": sampled_peak(step)[1]}))


def cpu_peak_mb(name: str, args) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--peak-memory",
        name,
        "--frames",
        str(args.frames),
        "--resolution",
        str(args.resolution),
        "--batch-size",
        str(args.batch_size),
        "--num-classes",
        str(args.num_classes),
    ]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    demo = load_config("demo")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=demo.data.num_frames)
    parser.add_argument("--resolution", type=int, default=demo.data.resolution)
    parser.add_argument("--batch-size", type=int, default=demo.train.batch_size)
    parser.add_argument("--num-classes", type=int, default=demo.data.num_classes)
    parser.add_argument("--repeats", type=int, default=4, help="rounds of one step per model")
    parser.add_argument("--matmul-size", type=int, default=None)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="ROWS", help="profile one step of each model"
    )
    parser.add_argument("--peak-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.peak_memory:
        return child_peak(args)

    device = torch.device(args.device)
    # as `matten train` does on a CPU; the peak-memory child does not (it returns freed memory
    # to the system, MALLOC_ENV, so that its resident-memory peak can be read)
    kept = device.type == "cpu" and keep_freed_memory()
    peak_mm = matmul_flops_per_second(
        device, args.matmul_size or (8192 if device.type == "cuda" else 4096)
    )
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"training step, batch {args.batch_size} x 3 x {args.frames} x {args.resolution} x "
        f"{args.resolution} (pixel space, patch 2), float32, {where}, torch {torch.__version__}"
    )
    print(f"large float32 matmul: {peak_mm / 1e9:.1f} GFLOP/s")
    if device.type == "cpu":
        print(f"malloc keeps freed memory (matten.allocator): {'yes' if kept else 'no'}")
    # Every model's step is built first and the steps are then timed in turns (one of each per
    # round), so that a slower or faster minute of a shared machine reaches both alike.
    runs = []
    for name, variant in MODELS:
        model = build(name, variant, args.frames, args.resolution, args.num_classes, device)
        step, forward = make_step(
            model, args.batch_size, args.frames, args.resolution, args.num_classes, device
        )
        runs.append((name, variant, model, step, step_flops(forward)))
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name, *_ in runs}
    for round_ in range(args.repeats):
        # the order alternates, so that neither model always runs right after the other
        for name, _, _, step, _ in runs[:: -1 if round_ % 2 else 1]:
            times[name].append(best_time(step, repeats=1, warmup=0))
    rows, results = [], {}
    for name, variant, model, step, flops in runs:
        params = sum(p.numel() for p in model.parameters())
        seconds = min(times[name])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak = cpu_peak_mb(name, args)
        achieved = flops / seconds
        results[name] = seconds
        label = f"{name} v{variant}" if variant else f"{name} (baseline)"
        rows.append(
            [
                label,
                f"{params / 1e6:.1f}",
                f"{flops / 1e9:.1f}",
                f"{1 / seconds:.2f}",
                f"{seconds * 1e3:.0f}",
                f"{peak:.0f}",
                f"{achieved / 1e9:.1f}",
                f"{achieved / peak_mm:.1%}",
            ]
        )
    print_table(
        [
            "model",
            "params M",
            "GFLOP/step",
            "steps/s",
            "ms/step",
            "peak extra MB",
            "achieved GFLOP/s",
            "of matmul FLOP/s",
        ],
        rows,
    )
    ratio = results["Matten-S/2"] / results["Latte-S/2"]
    per_round = sorted(
        m / lt for m, lt in zip(times["Matten-S/2"], times["Latte-S/2"], strict=True)
    )
    print(
        f"Matten-S/2 step time vs Latte-S/2: {ratio:.2f}x (best steps; per round, timed in turns: "
        + ", ".join(f"{r:.2f}x" for r in per_round)
        + ")"
    )
    for name, _, _, step, flops in runs if args.profile else []:
        print(f"\none profiled step of {name}:")
        own = profile_step(step, device, args.profile)
        total, scan = sum(own.values()), scan_seconds(own)
        if device.type == "cpu" and scan > 0:
            print(
                f"{name}: operators' own time {total * 1e3:.0f} ms, of which the selective scan "
                f"{scan * 1e3:.0f} ms ({scan / total:.0%}); without it the best step above "
                f"would reach {flops / (results[name] - scan) / peak_mm:.1%} of the matmul FLOP/s"
            )
    del runs


if __name__ == "__main__":
    main()
