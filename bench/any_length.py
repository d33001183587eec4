"""Any-length stability: every long-video memory, with both windows, trained on one budget and
compared on (a) content revisited beyond the attention's reach, at 1x and 4x the training clip
length, and (b) drift of the frames' statistics over a long free-running rollout.

One command trains Matten-Causal on the panning-map set (``--config long``) once per memory
(``--memories``, default ``none,ssm,delta,both,malt,malt+delta``) and window
(``--window-kinds``, default ``same_position,frame_local``): ``model.causal.memory`` and
``model.causal.window_kind`` are the only differences; steps, seed and everything else are the
same. Each run trains with ``train(cfg, output=run, resume="auto")``, so running the command
again resumes where it stopped (a finished run is not trained again), and each run's evaluation
is kept in ``RUN/any_length_eval.json`` and reused while its checkpoint step and the evaluation
settings are the same.

(a) **Revisits** (:func:`long_memory.evaluate`): test clips go out and come back the same way;
the first half is given (real frames, dark for just over the attention's reach at its end), the
way back is generated teacher-forced (each chunk from the real past) and free-running (from the
model's own frames), and every pixel is scored against the real one, grouped by how long its
map point had been out of sight. ``--lengths 1,4``: test clips of 1x and 4x the training clip
length (4x: the way out and the way back are 4x as long, so content comes back after gaps up to
4x longer); at 4x, gaps of at least the training clip length (longer than any training clip)
are also reported on their own.

(b) **Drift**: ``--drift-clips`` rollouts of ``--drift-frames`` frames (default 512), the first
``--drift-context`` frames real (default: the window), the rest free-running, driven by the
camera moves of real clips of that length (the training data's map and camera options, no
dark). Per frame: mean intensity, contrast (the standard deviation over a frame's pixels and
channels) and high-frequency energy (the mean squared 4-neighbour Laplacian), averaged over the
clips, against the same statistics of the real clips (the reference row; a model that fades
to grey loses contrast and high frequencies, one that decays into noise gains high
frequencies). Printed at frames 16, 128 and 512 (1-based, those within the rollout;
``--drift-marks``), per-frame curves in ``any_length_drift.json`` and ``any_length_drift.png``
(when matplotlib is installed).

Tables print as markdown; all results go to ``FOLDER/any_length.json``.

    # tiny check (a few minutes): 3 steps, 2 clips, 40-frame rollouts, a 1-block model
    python bench/any_length.py --train /tmp/anylen-tiny --steps 3 --clips 2 --drift-clips 2 \\
        --drift-frames 40 --sample-steps 4 model.depth=1 model.hidden_size=32 model.num_heads=2 \\
        sample.num_samples=1 sample.steps=4     # cheap end-of-training previews
    # the full comparison (defaults: 1000 steps, 32 clips, 4 rollouts of 512 frames, 10 DDIM steps)
    python bench/any_length.py --train runs/any-length
    # the same on both cores: two commands, each its share of the memories, then one report
    python bench/any_length.py --train runs/any-length --memories both,none,malt+delta \\
        --json runs/any-length/part-a.json &
    python bench/any_length.py --train runs/any-length --memories ssm,delta,malt \\
        --json runs/any-length/part-b.json
    python bench/any_length.py --checkpoint runs/any-length/*-{same_position,frame_local}
    # a longer budget continues the same runs (and evaluates them again)
    python bench/any_length.py --train runs/any-length --steps 3000 --sample-steps 25 \\
        --drift-clips 8
    # evaluate trained runs only
    python bench/any_length.py --checkpoint runs/any-length/none-same_position runs/...

Cost of the default run (12 runs: 6 memories x 2 windows, the packaged ``long`` model), measured
on the 2-core CPU as the two commands above, one thread each: 1 h 31 min in all; training took
0.36 s per step (``none``, same-position window) to 1.26 s (``both``, frame-local), an
evaluation 1-3 min. ``timing`` in the JSON has each run's measured seconds per training step and
per generated chunk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import print_table  # noqa: E402
from long_memory import TEST_SEED, evaluate, train_run  # noqa: E402

from matten.checkpoint import load_for_sampling  # noqa: E402
from matten.config import config_from_dict  # noqa: E402
from matten.data import PanningMapDataset  # noqa: E402
from matten.diffusion import create_diffusion  # noqa: E402
from matten.pipelines import generate_long  # noqa: E402

MEMORIES = ("none", "ssm", "delta", "both", "malt", "malt+delta")
WINDOW_KINDS = ("same_position", "frame_local")
STATS = ("mean", "contrast", "high-freq")
DRIFT_SEED = TEST_SEED + 1  # the drift clips: maps neither training nor the revisit test draws
EVAL_VERSION = 1  # bump when the evaluation changes, so cached results are redone


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# -- (b) drift -------------------------------------------------------------------------------


def frame_stats(video: torch.Tensor) -> np.ndarray:
    """Per-frame statistics of ``video`` (B, C, F, H, W) in [-1, 1] -> (3, F), averaged over the
    batch: mean intensity, contrast (std over a frame's channels and pixels) and high-frequency
    energy (mean squared 4-neighbour Laplacian over the inner pixels)."""
    x = video.double().transpose(1, 2)  # (B, F, C, H, W)
    flat = x.flatten(2)
    lap = (
        4 * x[..., 1:-1, 1:-1]
        - x[..., :-2, 1:-1]
        - x[..., 2:, 1:-1]
        - x[..., 1:-1, :-2]
        - x[..., 1:-1, 2:]
    )
    stats = torch.stack([flat.mean(2), flat.std(2), lap.pow(2).flatten(2).mean(2)])  # (3, B, F)
    return stats.mean(1).numpy()


def drift_clips(data, clips: int, frames: int) -> dict:
    """``clips`` real clips of ``frames`` frames with the training data's options, no dark."""
    options = {
        k: v
        for k, v in data.options.items()
        if k not in ("seed", "blackout", "blackout_frames", "blackout_start")
    }
    test = PanningMapDataset(
        clips, resolution=data.resolution, num_frames=frames, seed=DRIFT_SEED, **options
    )
    items = [test[i] for i in range(clips)]
    return {
        "video": torch.stack([it["video"] for it in items]),
        "actions": torch.stack([it["actions"] for it in items]),
    }


def drift(
    run: str, clips: int, frames: int, context: int | None, steps: int, chunk_size: int, seed: int
) -> dict:
    """A free-running rollout of ``frames`` frames per clip from ``context`` real frames ->
    {"generated": (3, frames) statistics, "real": the real clips' (3, frames), "context": n,
    "seconds", "chunks"}; the frames are reduced to statistics chunk by chunk, not kept."""
    loaded = load_for_sampling(run)
    model = loaded.model
    data = config_from_dict(loaded.meta["run_config"]).data
    context = context or model.config["window"]
    if not 1 <= context < frames:
        raise SystemExit(f"--drift-context must be in 1 .. {frames - 1}, got {context}")
    real = drift_clips(data, clips, frames)
    video = real["video"]
    diffusion = create_diffusion(
        str(steps),
        diffusion_steps=loaded.diffusion_steps,
        learn_sigma=loaded.learn_sigma,
        prediction=loaded.prediction,
        schedule=loaded.schedule,
    )
    parts = [frame_stats(video[:, :, :context])]
    start = time.perf_counter()
    chunks = generate_long(
        model,
        diffusion,
        frames,
        chunk_size,
        tuple(video.shape[1:2] + video.shape[3:]),
        batch=clips,
        actions=real["actions"] if model.takes_actions else None,
        context=video[:, :, :context],
        clip_denoised=True,
        generator=torch.Generator().manual_seed(seed),
        on_chunk=lambda chunk: parts.append(frame_stats(chunk.frames.clamp(-1, 1))),
    )
    seconds = time.perf_counter() - start
    return {
        "generated": np.concatenate(parts, axis=1),
        "real": frame_stats(video),
        "context": context,
        "seconds": seconds,
        "chunks": math.ceil((chunks - context) / chunk_size),
    }


def save_drift_plot(
    path: str, curves: dict[str, np.ndarray], real: np.ndarray, context: int
) -> str:
    """Per-frame curves of the three statistics, one line per model and the real data's; returns
    a note saying where it went (or why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no drift plot: matplotlib is not installed (the curves are in the JSON)"
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    frames = np.arange(1, real.shape[1] + 1)
    colours = plt.cm.tab20(np.linspace(0, 1, 20))  # 12 runs: more than the default 10
    for k, (ax, name) in enumerate(zip(axes, STATS, strict=True)):
        ax.plot(frames, real[k], "k--", lw=2, label="real data")
        for i, (label, values) in enumerate(curves.items()):
            ax.plot(frames, values[k], lw=1, color=colours[i % 20], label=label)
        ax.axvline(context + 0.5, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("frame")
        ax.set_title(name)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"drift plot: {path}"


# -- one run ---------------------------------------------------------------------------------


def pooled(errors: list[float], counts: list[int]) -> float:
    """The mean error over several pixel groups, from their means and sizes."""
    pairs = [(e, c) for e, c in zip(errors, counts, strict=True) if c and not math.isnan(e)]
    total = sum(c for _, c in pairs)
    return sum(e * c for e, c in pairs) / total if total else float("nan")


def evaluate_run(run: str, args) -> dict:
    """Revisits at every length and the drift rollout of ``run``, reusing
    ``RUN/any_length_eval.json`` when it was made from the same checkpoint step with the same
    settings."""
    loaded = load_for_sampling(run)
    config = loaded.model.config
    train_frames = config_from_dict(loaded.meta["run_config"]).data.num_frames
    settings = {
        "version": EVAL_VERSION,
        "step": loaded.step,
        "clips": args.clips,
        "lengths": args.lengths,
        "sample_steps": args.sample_steps,
        "chunk_size": args.chunk_size,
        "seed": args.seed,
        "drift_frames": args.drift_frames,
        "drift_clips": args.drift_clips,
        "drift_context": args.drift_context,
    }
    cache = os.path.join(run, "any_length_eval.json")
    if os.path.exists(cache):
        with open(cache) as f:
            kept = json.load(f)
        if kept.get("settings") == settings:
            print(f"evaluation of {run} at step {loaded.step}: kept from {cache}", flush=True)
            return kept
    del loaded
    result = {
        "settings": settings,
        "memory": config["memory"],
        "window_kind": config.get("window_kind", "same_position"),
        "window": config["window"],
        "train_frames": train_frames,
        "revisits": {},
    }
    for scale in args.lengths:
        frames = scale * train_frames
        print(f"evaluating {run}: revisits, test clips of {frames} frames", flush=True)
        start = time.perf_counter()
        errors, labels, info, _, _ = evaluate(
            run,
            args.clips,
            frames,
            args.sample_steps,
            args.chunk_size,
            args.seed,
            split_at=(train_frames,),
        )
        seconds = time.perf_counter() - start
        counts = info["counts"]
        entry = {
            "frames": frames,
            "labels": labels,
            "counts": counts,
            "reach": info["reach"],
            "errors": errors,
            "seconds": seconds,
            "chunks": 2 * math.ceil((frames - frames // 2) / args.chunk_size),
        }
        for mode, values in errors.items():
            entry.setdefault("in_reach", {})[mode] = values[0]
            entry.setdefault("beyond_reach", {})[mode] = pooled(values[1:], counts[1:])
            # gaps of at least the training clip length: longer than any training clip had
            long = [k + 1 for k, lab in enumerate(labels) if int(lab.split("-")[0]) >= train_frames]
            entry.setdefault("beyond_train_length", {})[mode] = pooled(
                [values[k] for k in long], [counts[k] for k in long]
            )
        result["revisits"][f"{scale}x"] = entry
        result["step"] = info["step"]
    print(f"evaluating {run}: drift over {args.drift_frames} frames", flush=True)
    d = drift(
        run,
        args.drift_clips,
        args.drift_frames,
        args.drift_context,
        args.sample_steps,
        args.chunk_size,
        args.seed,
    )
    result["drift"] = {
        "generated": d["generated"].tolist(),
        "real": d["real"].tolist(),
        "context": d["context"],
        "seconds": d["seconds"],
        "chunks": d["chunks"],
    }
    with open(cache, "w") as f:
        json.dump(result, f)
    return result


def label_of(result: dict) -> str:
    return f"{result['memory']}, {result['window_kind']}"


# -- the report ------------------------------------------------------------------------------


def fmt(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.4f}"


def report(results: dict[str, dict], marks: list[int], folder: str) -> dict:
    first = next(iter(results.values()))
    scales = list(first["revisits"])
    # (a) revisits
    header = ["memory", "window", "way back"]
    for s in scales:
        r = first["revisits"][s]
        header += [f"{s} in reach (<= {r['reach']})", f"{s} beyond reach"]
        if any(int(lab.split("-")[0]) >= first["train_frames"] for lab in r["labels"]):
            header.append(f"{s} gap >= {first['train_frames']}")
    rows = []
    for res in results.values():
        for mode in ("teacher-forced", "free-running"):
            row = [res["memory"], res["window_kind"], mode]
            for s in scales:
                r = res["revisits"][s]
                row += [fmt(r["in_reach"][mode]), fmt(r["beyond_reach"][mode])]
                if any(int(lab.split("-")[0]) >= res["train_frames"] for lab in r["labels"]):
                    row.append(fmt(r["beyond_train_length"][mode]))
            rows.append(row)
    step = first.get("step")
    lengths = ", ".join(f"{s}: {first['revisits'][s]['frames']} frames" for s in scales)
    print(
        f"\n(a) mean |pixel error| (in [-1, 1]) of the way back, {first['settings']['clips']} "
        f"test clips per length ({lengths}), "
        f"first half given (dark for the attention's reach + 1 at its end); step {step}, "
        f"window {first['window']}; pixels per group at "
        + "; ".join(f"{s}: {first['revisits'][s]['counts']}" for s in scales)
    )
    print_table(header, rows)

    # (b) drift
    frames = len(first["drift"]["real"][0])
    marks = [m for m in marks if 1 <= m <= frames]
    real = np.asarray(first["drift"]["real"])
    header = ["model"] + [f"{name} @{m}" for m in marks for name in STATS]
    rows = [
        ["real data (reference)"]
        + [f"{real[k, m - 1]:.4f}" for m in marks for k in range(len(STATS))]
    ]
    curves = {}
    for res in results.values():
        gen = np.asarray(res["drift"]["generated"])
        curves[label_of(res)] = gen
        rows.append(
            [label_of(res)] + [f"{gen[k, m - 1]:.4f}" for m in marks for k in range(len(STATS))]
        )
    print(
        f"\n(b) drift: {first['settings']['drift_clips']} free-running rollouts of {frames} "
        f"frames from {first['drift']['context']} real frames, per-frame statistics averaged "
        f"over the clips (pixels in [-1, 1]): mean intensity, contrast (std), high-freq "
        f"(mean squared Laplacian)"
    )
    print_table(header, rows)
    drift_json = os.path.join(folder, "any_length_drift.json")
    with open(drift_json, "w") as f:
        json.dump(
            {
                "stats": list(STATS),
                "context": first["drift"]["context"],
                "real": real.tolist(),
                "generated": {k: v.tolist() for k, v in curves.items()},
            },
            f,
        )
    print(f"per-frame curves: {drift_json}")
    print(
        save_drift_plot(
            os.path.join(folder, "any_length_drift.png"), curves, real, first["drift"]["context"]
        )
    )
    return {"marks": marks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--train",
        metavar="FOLDER",
        help="train every memory x window into FOLDER, then compare them",
    )
    source.add_argument("--checkpoint", nargs="+", help="trained Matten-Causal runs to compare")
    parser.add_argument("--config", default="long", help="config for --train")
    parser.add_argument(
        "--memories", default=",".join(MEMORIES), help="comma-separated model.causal.memory values"
    )
    parser.add_argument(
        "--window-kinds",
        default=",".join(WINDOW_KINDS),
        help="comma-separated model.causal.window_kind values",
    )
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for --train (repeatable; or give them positionally)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides for --train, e.g. model.depth=1",
    )
    parser.add_argument("--clips", type=int, default=32, help="test clips per length")
    parser.add_argument(
        "--lengths", default="1,4", help="test clip lengths, multiples of the training clip length"
    )
    parser.add_argument("--drift-frames", type=int, default=512, help="rollout length")
    parser.add_argument("--drift-clips", type=int, default=4, help="rollouts per model")
    parser.add_argument(
        "--drift-context",
        type=int,
        default=None,
        help="real frames the rollout starts from (default: the window)",
    )
    parser.add_argument(
        "--drift-marks",
        default="16,128,512",
        help="1-based frames at which the drift table is printed",
    )
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps per chunk")
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", default=None, help="results file (default: FOLDER/any_length.json)"
    )
    args = parser.parse_args()
    args.lengths = [int(x) for x in csv(args.lengths)]
    marks = [int(x) for x in csv(args.drift_marks)]
    if not args.lengths or min(args.lengths) < 1:
        parser.error("--lengths must be positive integers")
    if args.checkpoint and (args.set or args.overrides):
        parser.error("config overrides go with --train only")
    bad = [m for m in csv(args.memories) if m not in MEMORIES + ("malt+ssm", "malt+both")]
    if bad:
        parser.error(f"unknown memories {bad}")

    torch.set_grad_enabled(False)
    folder = args.train or os.path.dirname(os.path.abspath(args.checkpoint[0]))
    os.makedirs(folder, exist_ok=True)
    out = args.json or os.path.join(folder, "any_length.json")
    if args.train:
        runs = [
            (os.path.join(args.train, f"{memory}-{kind}"), memory, kind)
            for memory in csv(args.memories)
            for kind in csv(args.window_kinds)
        ]
    else:
        runs = [(run, None, None) for run in args.checkpoint]
    results, timing = {}, {}
    if os.path.exists(out):  # a resumed command keeps the training times measured before
        with open(out) as f:
            kept = json.load(f).get("timing", {})
        timing = {run: kept[run] for run, _, _ in runs if run in kept}
    for run, memory, kind in runs:
        timing.setdefault(run, {})
        if args.train:
            start = time.perf_counter()
            with torch.enable_grad():
                done = train_run(
                    run,
                    args.config,
                    args.set
                    + args.overrides
                    + [f"model.causal.memory={memory}", f"model.causal.window_kind={kind}"],
                    args.steps,
                )
            trained = 0 if done.nothing_to_do else len(done.losses)
            if trained:  # the time of this call's steps, previews and checkpoints included
                timing[run].update(train_seconds=time.perf_counter() - start, steps_trained=trained)
                timing[run]["seconds_per_step"] = timing[run]["train_seconds"] / trained
        res = evaluate_run(run, args)
        timing[run] = {
            k: v for k, v in timing[run].items() if not k.startswith("seconds_per_chunk")
        }
        results[run] = res
        for scale, entry in res["revisits"].items():
            timing[run][f"seconds_per_chunk_{scale}"] = entry["seconds"] / max(entry["chunks"], 1)
        timing[run]["seconds_per_chunk_drift"] = res["drift"]["seconds"] / max(
            res["drift"]["chunks"], 1
        )
        with open(out, "w") as f:  # after every run, so an interrupted command leaves results
            json.dump({"args": vars(args), "results": results, "timing": timing}, f)
    extra = report(results, marks, folder)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "results": results, "timing": timing, **extra}, f)
    print(
        "\ntiming (s): "
        + "; ".join(
            f"{os.path.basename(r)}: " + ", ".join(f"{k} {v:.3g}" for k, v in t.items())
            for r, t in timing.items()
        )
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
