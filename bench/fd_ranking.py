"""Does the offline evaluation rank what it should? On the run's own data (the synthetic set or
moving digits), against the training clips (the reference `matten eval` uses), it should order

    (a) held-out real clips  <  (b) samples of the trained model  <  (c) samples of the same
    model untrained (fresh weights)  <  (d) uniform noise videos

in FD, FD_inf and KID (lower is better), with precision and recall (higher is better) beside
them. With --ladder it also scores every checkpoint kept in the run (and step 0, the untrained
model), which should improve with the step. The last line reads
``ranking: real A < trained B < untrained C < noise D`` (FD; a ">=" where the order breaks).

    python bench/fd_ranking.py --checkpoint runs/demo [--num-clips 256]
    python bench/fd_ranking.py --checkpoint runs/digits --data moving_digits --ladder
    python bench/fd_ranking.py --checkpoint runs/demo --ladder --ladder-steps 250,500,1000 \
        --num-clips 128 --sample-steps 25      # fewer checkpoints and sampler steps: faster

The ladder reuses the samples of (b) and (c) for the run's last checkpoint and step 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from matten.checkpoint import config_from_checkpoint, list_checkpoints, load_for_sampling
from matten.data import dataset_from_config, video_to_uint8
from matten.eval.evaluate import build_extractor, clip_features, real_clips
from matten.eval.metrics import quality_metrics
from matten.models import build_model
from matten.pipelines import sample_videos

DATA = ("synthetic", "moving_digits")


def sampled_clips(model, loaded, n, batch, seed, steps=50) -> np.ndarray:
    run = config_from_checkpoint(loaded.folder)
    out = []
    for lo in range(0, n, batch):
        size = min(batch, n - lo)
        labels = (torch.arange(lo, lo + size) % loaded.num_classes) if loaded.num_classes else None
        videos = sample_videos(
            model,
            loaded.autoencoder,
            size,
            loaded.num_frames,
            loaded.latent_size,
            labels=labels,
            sampler="ddim",
            steps=steps,
            cfg_scale=run.sample.cfg_scale if labels is not None else 1.0,
            seed=seed + lo,
            learn_sigma=loaded.learn_sigma,
            diffusion_steps=loaded.diffusion_steps,
            prediction=loaded.prediction,
            schedule=loaded.schedule,
        )
        out.append(video_to_uint8(videos))
    return np.concatenate(out)


def held_out_data(data):
    """The same distribution, other clips: another seed of the synthetic set, or the moving
    digits' test split (other scans and other trajectories)."""
    if data.name == "moving_digits":
        return dataclasses.replace(data, split="test")
    return dataclasses.replace(data, options={**data.options, "seed": 12345})


def summary(m: dict) -> str:
    kid = m["kid"]
    fd_inf = "-" if m["fd_inf"] is None else f"{m['fd_inf']:.3f}"
    kid_text = "-" if kid is None else f"{kid['mean']:.4f} ± {kid['std_err']:.4f}"
    pr = "-" if m["precision"] is None else f"{m['precision']:.2f} / {m['recall']:.2f}"
    return f"{m['fd']:10.3f} {fd_inf:>10s} {kid_text:>20s} {pr:>12s}"


HEADER = f"{'FD':>10s} {'FD_inf':>10s} {'KID ± err':>20s} {'prec / rec':>12s}"


def ladder(args, loaded, extractor, reference, n, known) -> list[tuple[int, dict]]:
    """Every checkpoint kept in the run (or those of ``--ladder-steps``), and step 0 (fresh
    weights), scored the same way; ``known``: features already sampled, by step (step 0 and the
    checkpoint scored above, sampled with the same weights and seeds)."""
    run_dir = loaded.folder.parent.parent
    wanted = {int(x) for x in args.ladder_steps.split(",")} if args.ladder_steps else None
    folders = dict(list_checkpoints(run_dir))
    if Path(folders.get(loaded.step, "")).resolve() != Path(loaded.folder).resolve():
        known = {0: known[0]}  # the checkpoint scored above is not this run's
    rows = []
    for step in [0, *folders]:
        if step != 0 and wanted is not None and step not in wanted:
            continue
        if step in known:
            features = known[step]
        else:
            model = load_for_sampling(folders[step]).model
            clips = sampled_clips(model, loaded, n, args.batch_size, 10_000, args.sample_steps)
            features = clip_features(extractor, clips)
        rows.append((step, quality_metrics(reference, features)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--data",
        choices=DATA,
        default=None,
        help="the dataset the run was trained on (default: the run's)",
    )
    parser.add_argument("--num-clips", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--motion-net-version",
        type=int,
        choices=(1, 2),
        default=None,
        help="the offline feature net (default: the current one, v2)",
    )
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="also score every checkpoint kept in the run, and step 0",
    )
    parser.add_argument(
        "--ladder-steps", default=None, help="the ladder's checkpoints only, e.g. 250,500,1000"
    )
    parser.add_argument(
        "--sample-steps", type=int, default=50, help="DDIM steps when sampling (default 50)"
    )
    args = parser.parse_args()

    loaded = load_for_sampling(args.checkpoint)
    data = config_from_checkpoint(loaded.folder).data
    if data.name not in DATA:
        raise SystemExit(
            f"this check is for runs on {' or '.join(DATA)}; this run was trained on {data.name}"
        )
    if args.data is not None and args.data != data.name:
        raise SystemExit(
            f"--data {args.data}: the checkpoint was trained on {data.name}; pass "
            f"a run trained on {args.data}"
        )
    extractor = build_extractor(
        None,
        args.cache_dir or loaded.folder.parent.parent / "eval" / "cache",
        data.resolution,
        data.num_frames,
        motion_net_version=args.motion_net_version,
    )
    n = args.num_clips

    def features(clips_or_batches) -> np.ndarray:
        batches = clips_or_batches if isinstance(clips_or_batches, list) else [clips_or_batches]
        return np.concatenate([clip_features(extractor, c) for c in batches])

    data.num_videos = max(data.num_videos, n)
    reference = features(list(real_clips(dataset_from_config(data, seed=0), n)))
    torch.manual_seed(0)
    untrained = build_model(**loaded.meta["model_config"]).eval()
    noise = np.random.default_rng(0).integers(
        0, 256, (n, data.num_frames, data.resolution, data.resolution, 3), dtype=np.uint8
    )
    sets = {
        "(a) held-out real clips": features(
            list(real_clips(dataset_from_config(held_out_data(data), seed=0), n))
        ),
        "(b) trained model samples": features(
            sampled_clips(loaded.model, loaded, n, args.batch_size, 10_000, args.sample_steps)
        ),
        "(c) untrained model samples": features(
            sampled_clips(untrained, loaded, n, args.batch_size, 10_000, args.sample_steps)
        ),
        "(d) uniform noise": features(noise),
    }
    results = {name: quality_metrics(reference, f) for name, f in sets.items()}
    print(
        f"{data.name}: offline metrics in {extractor.cache_name} features (not comparable "
        f"with published FVD) against {n} training clips, {n} clips each; checkpoint step "
        f"{loaded.step}"
    )
    warning = results["(b) trained model samples"]["warning"]
    if warning:
        print(f"  warning: {warning}")
    print(f"  {'':30s} {HEADER}")
    for name, m in results.items():
        print(f"  {name:30s} {summary(m)}")
    if args.ladder:
        print("checkpoint ladder (step 0: fresh weights)")
        # step 0 is the untrained model above, the run's last checkpoint the trained one
        known = {
            0: sets["(c) untrained model samples"],
            loaded.step: sets["(b) trained model samples"],
        }
        scored = ladder(args, loaded, extractor, reference, n, known)
        for step, m in scored:
            print(f"  step {step:<25d} {summary(m)}")
        fds = [m["fd"] for _, m in scored]
        print("ladder improves with every step:", all(a > b for a, b in itertools.pairwise(fds)))
    fds = [m["fd"] for m in results.values()]
    print("ordered as expected:", all(a < b for a, b in itertools.pairwise(fds)))
    ratio = fds[1] / fds[2]
    print(f"trained / untrained FD: {ratio:.2f} (clearly separated, at most 0.5: {ratio <= 0.5})")
    print(
        json.dumps(
            {
                name: {k: m[k] for k in ("fd", "fd_inf", "kid", "precision", "recall")}
                for name, m in results.items()
            }
        )
    )
    names = ("real", "trained", "untrained", "noise")
    parts = [f"{names[0]} {fds[0]:.3f}"]
    for i in range(1, 4):
        parts.append(f"{'<' if fds[i - 1] < fds[i] else '>='} {names[i]} {fds[i]:.3f}")
    print("ranking: " + " ".join(parts))


if __name__ == "__main__":
    main()
