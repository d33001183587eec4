"""Memory after long gaps: does the global memory bring back what has left the attention window?

A Matten-Causal model trained on the panning-map set is given the first half of test clips (real
frames: the camera's way out) and generates the second half with the real camera moves (the way
back, over places seen before). Every generated pixel is scored against the real one, grouped by
how long its map point had been out of sight (:func:`matten.data.pixel_last_seen`). Each block's
window reaches ``window - 1`` frames back, and stacked blocks reach further (a frame reads the
frames before it, which read the frames before them): ``depth * (window - 1)`` frames in all. A
point seen within that reach (or in a sink frame) may come from the local attention; a point out
of sight for longer can only come back through the global memory. The test clips go dark for
just over that reach before the half the model generates, so the first lit frame is all memory.

The way back is generated twice: *teacher-forced*, each chunk from the real past (what the
memory retrieves), and *free-running*, from the model's own frames (real generation, where
errors pile up).

The ablation, one command: train ``memory: none`` (the window alone) and ``memory: delta`` (or
``--memory ssm|both``) from the same config, seed and steps, then evaluate both:

    python bench/long_memory.py --train runs/memory-ablation            # ~30 min on 2 CPU cores
    python bench/long_memory.py --checkpoint runs/a runs/b              # compare trained runs

Training resumes where it stopped when run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import print_table  # noqa: E402

from matten.checkpoint import load_for_sampling  # noqa: E402
from matten.config import config_from_dict, load_config  # noqa: E402
from matten.data import DARK, PanningMapDataset  # noqa: E402
from matten.diffusion import create_diffusion  # noqa: E402
from matten.eval.long_memory import pixel_last_seen  # noqa: E402
from matten.pipelines import generate_long  # noqa: E402

TEST_SEED = 987_654  # maps the training set (seed 0, items 0 .. num_videos - 1) never draws


def train_ablation(
    folder: str, config: str, memory: str, steps: int, overrides: list[str]
) -> list[str]:
    """Train ``model.causal.memory=none`` and ``model.causal.memory=<memory>``; returns the two
    run folders."""
    runs = []
    for kind in ("none", memory):
        run = os.path.join(folder, f"memory-{kind}")
        train_run(run, config, overrides + [f"model.causal.memory={kind}"], steps)
        runs.append(run)
    return runs


def train_run(run: str, config: str, overrides: list[str], steps: int):
    """Train ``config`` with ``overrides`` for ``steps`` steps into ``run``, resuming from its
    latest checkpoint (nothing to do when it is already there); returns the TrainResult."""
    from matten.training import train

    cfg = load_config(config, overrides + [f"train.max_steps={steps}"])
    print(f"training {run} ({steps} steps)", flush=True)
    return train(cfg, output=run, resume="auto", progress=sys.stderr.isatty())


def pixel_groups(
    camera: np.ndarray,
    visible: np.ndarray,
    first: int,
    height: int,
    width: int,
    reach: int,
    sink: int,
    edges: list[int],
) -> np.ndarray:
    """Group of every pixel of frames first .. F - 1, (F - first, H, W): 0 in reach of the
    local attention (out of sight for at most ``reach`` frames, or in a sink frame), k >= 1 out
    of sight for a gap in [edges[k - 1], edges[k]), -1 never seen before or in a dark frame."""
    last = pixel_last_seen(camera, height, width, visible)
    gap = np.arange(len(camera))[:, None, None] - last
    rows = camera[:, 1, None, None] + np.arange(height)[None, :, None]
    cols = camera[:, 0, None, None] + np.arange(width)[None, None, :]
    in_sink = np.zeros_like(last, dtype=bool)
    for s in range(min(sink, first)):  # lit sink frames stay in the attention's reach
        x, y = camera[s]
        in_sink |= visible[s] & (rows >= y) & (rows < y + height) & (cols >= x) & (cols < x + width)
    group = np.searchsorted(edges, gap, side="right")  # 1 .. len(edges) - 1 when inside
    group = np.where((gap <= reach) | in_sink, 0, group)
    group = np.where((last < 0) | ~visible[:, None, None], -1, group)
    return group[first:]


def evaluate(
    run: str,
    clips: int,
    frames: int | None,
    steps: int,
    chunk_size: int,
    seed: int,
    split_at: tuple[int, ...] = (),
) -> tuple[dict, list[str], dict, torch.Tensor, torch.Tensor]:
    """Mean |error| per pixel group for both ways of generating -> (errors, labels, info,
    the real clips, the free-running videos: the given half then the generated one).

    ``frames``: the test clips' length (default: the training clips'); the way out is always
    the first half, so longer clips revisit content after longer gaps. The pixels out of sight
    for longer than the attention's reach form one group, or one per gap range with
    ``split_at`` (gaps, e.g. the training clip length: a group for gaps training never had)."""
    loaded = load_for_sampling(run)
    model, config = loaded.model, loaded.model.config
    data = config_from_dict(loaded.meta["run_config"]).data
    frames = frames or data.num_frames
    half, sink = frames // 2, config["sink"]
    reach = config["depth"] * (config["window"] - 1)
    if half - reach - 1 < 1:
        raise SystemExit(
            f"test clips of {frames} frames are too short to go dark for "
            f"{reach + 1} frames (the attention's reach + 1) before their second half"
        )
    # every test clip goes dark for reach + 1 frames just before the half the model generates
    dark = dict(
        blackout=1.0, blackout_frames=(reach + 1, reach + 1), blackout_start=half - reach - 1
    )
    options = {k: v for k, v in data.options.items() if k not in ("seed", "trajectory", *dark)}
    test = PanningMapDataset(
        clips,
        resolution=data.resolution,
        num_frames=frames,
        seed=TEST_SEED,
        trajectory="out_and_back",
        **options,
        **dark,
    )
    items = [test[i] for i in range(clips)]
    video = torch.stack([it["video"] for it in items])  # (B, 3, F, H, W)
    actions = torch.stack([it["actions"] for it in items])
    height, width = video.shape[-2:]
    edges = [reach + 1, *sorted(g for g in set(split_at) if reach + 1 < g < frames), frames]
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    groups = np.stack(
        [
            pixel_groups(
                it["camera"].numpy().astype(np.int64),
                (it["actions"] != DARK).numpy(),
                half,
                height,
                width,
                reach,
                sink,
                edges,
            )
            for it in items
        ]
    )  # (B, F - half, H, W)
    diffusion = create_diffusion(
        str(steps),
        diffusion_steps=loaded.diffusion_steps,
        learn_sigma=loaded.learn_sigma,
        prediction=loaded.prediction,
        schedule=loaded.schedule,
    )
    errors, videos = {}, {}
    for mode in ("teacher-forced", "free-running"):
        generated = generate_long(
            model,
            diffusion,
            frames,
            chunk_size,
            (3, height, width),
            batch=clips,
            actions=actions if model.takes_actions else None,
            context=video[:, :, :half],
            teacher=video if mode == "teacher-forced" else None,
            clip_denoised=True,
            generator=torch.Generator().manual_seed(seed),
        )
        generated = generated.clamp(-1, 1)
        videos[mode] = torch.cat([video[:, :, :half], generated], dim=2)
        error = (generated - video[:, :, half:]).abs().mean(1).numpy()
        errors[mode] = [
            float(error[groups == g].mean()) if (groups == g).any() else float("nan")
            for g in range(len(edges))
        ]
    counts = [int((groups == g).sum()) for g in range(len(edges))]
    info = {
        "memory": config["memory"],
        "step": loaded.step,
        "window": config["window"],
        "reach": reach,
        "sink": sink,
        "frames": frames,
        "counts": counts,
    }
    return errors, labels, info, video, videos["free-running"]


def save_figure(path: str, real: torch.Tensor, generated: list[torch.Tensor], clips: int = 3):
    """A PNG: for each of the first ``clips`` clips, a row of real frames, then a row per model
    (its given half, then what it generated)."""
    from matten.data import save_grid_image, upscale_frames, video_to_uint8

    rows = [v[i] for i in range(min(clips, len(real))) for v in [real, *generated]]
    frames = np.stack([video_to_uint8(r) for r in rows])  # (rows, F, H, W, 3)
    save_grid_image(path, upscale_frames(frames, 48), padding=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", nargs="+", help="trained Matten-Causal runs to compare")
    source.add_argument(
        "--train", metavar="FOLDER", help="train the ablation pair into FOLDER, then compare them"
    )
    parser.add_argument("--config", default="long", help="config for --train")
    parser.add_argument(
        "--memory",
        default="delta",
        choices=("ssm", "delta", "both"),
        help="the global memory --train sets against the window alone",
    )
    parser.add_argument("--steps", type=int, default=3000, help="training steps for --train")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for --train (repeatable)",
    )
    parser.add_argument("--clips", type=int, default=32, help="test clips")
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="test clip length (default: the training clip length)",
    )
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps per chunk")
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--figure",
        default=None,
        metavar="PNG",
        help="also save the first clips, real and free-running, per model",
    )
    args = parser.parse_args()

    runs = args.checkpoint or train_ablation(
        args.train, args.config, args.memory, args.steps, args.set
    )
    torch.set_grad_enabled(False)
    rows, report, generated = [], {}, []
    for run in runs:
        errors, labels, info, real, free = evaluate(
            run, args.clips, args.frames, args.sample_steps, args.chunk_size, args.seed
        )
        generated.append(free)
        report[run] = {"errors": errors, **info}
        for mode, values in errors.items():
            rows.append(
                [f"memory {info['memory']} (step {info['step']})", mode]
                + [f"{v:.4f}" for v in values]
            )
    first = report[runs[0]]
    print(
        f"mean |pixel error| (in [-1, 1]) of the way back, {args.clips} test clips of "
        f"{first['frames']} frames, first {first['frames'] // 2} given (dark for the last "
        f"{first['reach'] + 1}); window {first['window']}, sink {first['sink']}, attention "
        f"reach {first['reach']} frames; pixels per group {first['counts']}"
    )
    print_table(
        ["model", "way back", f"seen <= {first['reach']} frames ago"]
        + [f"out of sight {g} frames" for g in labels],
        rows,
    )
    print(json.dumps(report))
    if args.figure:
        save_figure(args.figure, real, generated)
        print(
            f"figure: {args.figure} (per clip: real, then "
            + ", ".join(f"memory {info['memory']}" for info in report.values())
            + ")"
        )
    beyond = {info["memory"]: info["errors"]["teacher-forced"][1:] for info in report.values()}
    if len(beyond) > 1:
        print(
            "teacher-forced error beyond the attention's reach: "
            + ", ".join(
                f"{kind} " + " / ".join(f"{v:.4f}" for v in values)
                for kind, values in beyond.items()
            )
        )


if __name__ == "__main__":
    main()
