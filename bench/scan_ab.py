"""The CPU scan kernels against an older tree's, alternated call by call in one process.

Both kernels get the same inputs (delta_bias, softplus, D and the z gate, as the Mamba layer
calls them; dim 768, N 16, float32) and are timed in turns, forward and backward, the order
alternating from round to round; the table gives each one's median and best. The older tree's
``matten/ssm/cpu_kernel.py`` is loaded beside this checkout's (its relative imports pointed at
this checkout's ``matten.ssm``), so any tree since the kernels took the direction and the gate
works. Both are first compiled in a child process, so that both are timed loaded from numba's
cache, as every run after a user's first gets them: the same kernel compiled in the timing
process itself ran at another speed (bench/RESULTS.md).

    git worktree add /tmp/matten-old <rev> --detach
    python bench/scan_ab.py --old-src /tmp/matten-old/src
    python bench/scan_ab.py --old-src /tmp/matten-old/src --batch 16 --threads 2
    python bench/scan_ab.py --old-src /tmp/matten-old/src --batch 1 --length 4096
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import print_table  # noqa: E402

from matten.ssm import cpu_kernel  # noqa: E402

DIM, NSTATE = 768, 16


def load_old_kernel(src: str):
    """The older tree's cpu_kernel module, importing this checkout's layouts and threads."""
    path = os.path.join(src, "matten", "ssm", "cpu_kernel.py")
    with open(path) as f:
        code = f.read().replace(
            "from . import layouts, threads", "from matten.ssm import layouts, threads"
        )
    # One folder per source, kept: numba caches the copy's kernels beside it.
    digest = hashlib.sha1(code.encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), f"matten-old-kernel-{digest}")
    os.makedirs(folder, exist_ok=True)
    copy = os.path.join(folder, "old_cpu_kernel.py")
    if not os.path.exists(copy):  # rewritten, it would invalidate numba's cache
        with open(copy + ".tmp", "w") as f:
            f.write(code)
        os.replace(copy + ".tmp", copy)
    spec = importlib.util.spec_from_file_location("old_cpu_kernel", copy)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_cpu_kernel"] = module  # numba's cache finds its kernels' module by name
    spec.loader.exec_module(module)
    return module


def make_calls(kernel, inputs, reverse):
    """forward() and backward() of one kernel; kernels that keep checkpoints hand them on."""
    u, delta, A, B, C, h0, D, z, bias, dy, dh = inputs
    saved = {}

    def forward():
        out = kernel.scan_forward(u, delta, A, B, C, h0, D, z, bias, True, reverse)
        saved["checkpoints"] = out[2] if len(out) == 3 else None

    def backward():
        args = (u, delta, A, B, C, h0)
        if saved["checkpoints"] is not None:
            args = (*args, saved["checkpoints"])
        kernel.scan_backward(*args, dy, dh, D, z, bias, True, reverse)

    return forward, backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-src", required=True, help="the older tree's src folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reverse", action="store_true", help="scan from the end")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not args.compile_only:  # fill numba's cache first (see the module's docstring)
        subprocess.run([sys.executable, *sys.argv, "--compile-only"], check=True)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    batch, length = args.batch, args.length
    inputs = (
        r(batch, DIM, length),
        r(batch, DIM, length) * 0.5,
        -torch.rand(DIM, NSTATE, generator=g) * 3,
        r(batch, NSTATE, length),
        r(batch, NSTATE, length),
        torch.zeros(batch, DIM, NSTATE),
        r(DIM),
        r(batch, DIM, length),
        r(DIM) * 0.1,
        r(batch, DIM, length),
        torch.zeros(batch, DIM, NSTATE),
    )
    kernels = {"old": load_old_kernel(args.old_src), "new": cpu_kernel}
    calls = {name: make_calls(k, inputs, args.reverse) for name, k in kernels.items()}
    for forward, backward in calls.values():  # compile or load, and check both run
        forward()
        backward()
    if args.compile_only:
        return
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
        for name in order:
            for part, call in zip(("fwd", "bwd"), calls[name], strict=True):
                start = time.perf_counter()
                call()
                times.setdefault((name, part), []).append(time.perf_counter() - start)
    print(
        f"CPU scan kernels, batch {batch}, dim {DIM}, L {length}, N {NSTATE}, float32, "
        f"{args.threads} thread(s), {args.rounds} rounds in turns; old: {args.old_src}"
    )
    rows = []
    for name in calls:
        fwd, bwd = times[(name, "fwd")], times[(name, "bwd")]
        rows.append(
            [
                name,
                f"{1000 * statistics.median(fwd):.1f}",
                f"{1000 * min(fwd):.1f}",
                f"{1000 * statistics.median(bwd):.1f}",
                f"{1000 * min(bwd):.1f}",
                f"{statistics.median(bwd) / statistics.median(fwd):.2f}x",
            ]
        )
    print_table(
        ["kernel", "fwd median ms", "fwd best ms", "bwd median ms", "bwd best ms", "bwd / fwd"],
        rows,
    )


if __name__ == "__main__":
    main()
