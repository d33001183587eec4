"""Two training processes on one machine: the demo's steps/s alone and side by side.

Each process trains the demo config's model (``matten train --config demo``: Matten-S/2 v3, 2
blocks, hidden 64, batch 16 of 8 frames at 16x16, pixel space) for a fixed wall time, one step =
diffusion loss, backward, gradient clipping, AdamW. A process first warms up (compilation,
allocator), then waits for the go signal, so that side-by-side processes overlap for the whole
measurement. The fair-share goal: each of two processes keeps at least 0.4x of its solo speed.

Settings run in the same invocation:
  * "defaults": the environment as it is: busy Matten processes split the cores between them
    (:mod:`matten.cpu_share`), numba's threads follow torch's count (:mod:`matten.ssm.threads`),
    OpenMP's threads spin a while when they wait;
  * "MATTEN_SPLIT_CORES=0": the same without the split (each process runs on every core, as
    torch does by default);
  * "MATTEN_SPLIT_CORES=0 MATTEN_SHARED_CPU=1": no split, and waiting threads sleep
    (``OMP_WAIT_POLICY=PASSIVE``, see ``matten/__init__.py``);
  * with ``--old-src DIR``: the code of another source tree (e.g. ``git archive <commit> src |
    tar -x -C DIR``), to compare with the code before these changes.

    python bench/contention.py
    python bench/contention.py --seconds 20 --old-src /tmp/matten-old
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(seconds: float) -> None:
    """Build the demo model, warm up, say "ready", wait for a line on stdin, then step for
    ``seconds`` of wall time and print the steps/s as JSON."""
    # isort: off
    import matten  # noqa: F401  (first: MATTEN_SHARED_CPU must act before torch loads libgomp)
    import torch

    # isort: on
    from matten.config import config_to_dict, load_config
    from matten.diffusion import create_diffusion
    from matten.models import build_model, model_kwargs_for_run

    cfg = load_config("demo")
    torch.manual_seed(0)
    model = build_model(
        **model_kwargs_for_run(
            config_to_dict(cfg)["model"],
            in_channels=3,
            latent_hw=(cfg.data.resolution,) * 2,
            num_classes=cfg.data.num_classes,
            num_frames=cfg.data.num_frames,
        )
    )
    diffusion = create_diffusion(
        prediction=cfg.diffusion.prediction, schedule=cfg.diffusion.schedule
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    g = torch.Generator().manual_seed(0)
    batch, frames, res = cfg.train.batch_size, cfg.data.num_frames, cfg.data.resolution
    x = torch.rand(batch, 3, frames, res, res, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (batch,), generator=g)
    kwargs = {"y": torch.arange(batch) % cfg.data.num_classes}

    def step():
        loss = diffusion.training_losses(model, x, t, model_kwargs=kwargs)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    print("ready", flush=True)
    sys.stdin.readline()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    print(json.dumps({"steps_per_s": steps / (time.perf_counter() - start)}), flush=True)


def run_side_by_side(count: int, seconds: float, env: dict) -> list[float]:
    """Start ``count`` children, release them together once all are warm; their steps/s."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--seconds", str(seconds)]
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(count)
    ]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a child did not start: {line!r}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a child failed")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured wall time per run")
    parser.add_argument("--repeats", type=int, default=2, help="solo runs per setting (best kept)")
    parser.add_argument("--old-src", default=None, help="source tree (its src/) for the old runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.seconds)

    import torch  # only for the header

    ours = ("MATTEN_SHARED_CPU", "MATTEN_SPLIT_CORES", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")
    base = {k: v for k, v in os.environ.items() if k not in ours}
    no_split = {**base, "MATTEN_SPLIT_CORES": "0"}
    shared = {**no_split, "MATTEN_SHARED_CPU": "1"}
    old = {**base, "PYTHONPATH": os.path.join(os.path.abspath(args.old_src or "."), "src")}
    settings = [
        ("defaults", base),
        ("MATTEN_SPLIT_CORES=0", no_split),
        ("MATTEN_SPLIT_CORES=0 MATTEN_SHARED_CPU=1", shared),
    ]
    if args.old_src:
        settings.append((f"old code ({args.old_src}), its defaults", old))
    print(
        f"demo training step (Matten-S/2 v3, 2 blocks, hidden 64, batch 16 x 3 x 8 x 16 x 16), "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.seconds:.0f} s per run"
    )
    rows, solo_rates = [], {}
    for name, env in settings:
        solo = max(run_side_by_side(1, args.seconds, env)[0] for _ in range(args.repeats))
        pair = run_side_by_side(2, args.seconds, env)
        solo_rates[name] = solo
        rows.append(
            [
                name,
                f"{solo:.2f}",
                " / ".join(f"{r:.2f}" for r in pair),
                " / ".join(f"{r / solo:.2f}x" for r in pair),
            ]
        )
    sys.path.insert(0, HERE)
    from _common import print_table

    print_table(
        ["settings", "solo steps/s", "two side by side, steps/s each", "of solo speed"], rows
    )
    (new_name, new), *others = solo_rates.items()
    for name, rate in others:
        print(f"solo speed, defaults vs {name}: {new / rate:.2f}x")
    for name, row in zip(solo_rates, rows, strict=True):
        pair = [float(r) for r in row[2].split(" / ")]
        print(
            f"each of two with {name}, of the default solo speed: "
            + " / ".join(f"{r / new:.2f}x" for r in pair)
        )


if __name__ == "__main__":
    main()
