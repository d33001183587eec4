"""Does the offline Fréchet distance rank what it should? On the synthetic set, against the
training clips (the reference statistics `matten eval` uses), it should order

    (a) held-out real clips  <  (b) samples of the trained model  <  (c) samples of the same
    model untrained (fresh weights)  <  (d) uniform noise videos

    python bench/fd_ranking.py --checkpoint runs/demo [--num-clips 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import torch

from matten.data import video_to_uint8
from matten.eval.evaluate import build_extractor, clip_features, real_clips
from matten.eval.frechet import FeatureStats
from matten.models import build_model
from matten.checkpoint import config_from_checkpoint, load_for_sampling
from matten.pipelines import sample_videos
from matten.data import dataset_from_config as build_train_dataset


def sampled_clips(model, loaded, n, batch, seed) -> np.ndarray:
    run = config_from_checkpoint(loaded.folder)
    out = []
    for lo in range(0, n, batch):
        size = min(batch, n - lo)
        labels = (torch.arange(lo, lo + size) % loaded.num_classes) if loaded.num_classes else None
        videos = sample_videos(model, loaded.autoencoder, size, loaded.num_frames,
                               loaded.latent_size, labels=labels, sampler="ddim", steps=50,
                               cfg_scale=run.sample.cfg_scale if labels is not None else 1.0,
                               seed=seed + lo, learn_sigma=loaded.learn_sigma,
                               diffusion_steps=loaded.diffusion_steps,
                               prediction=loaded.prediction)
        out.append(video_to_uint8(videos))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-clips", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()

    loaded = load_for_sampling(args.checkpoint)
    data = config_from_checkpoint(loaded.folder).data
    if data.name != "synthetic":
        raise SystemExit("this check is for runs on the synthetic set")
    extractor = build_extractor(None, args.cache_dir or loaded.folder.parent.parent / "eval" /
                                "cache", data.resolution, data.num_frames)
    n = args.num_clips

    def stats(clips_or_batches) -> FeatureStats:
        batches = clips_or_batches if isinstance(clips_or_batches, list) else [clips_or_batches]
        return FeatureStats.from_features(np.concatenate(
            [clip_features(extractor, c) for c in batches]))

    data.num_videos = max(data.num_videos, n)
    reference = stats(list(real_clips(build_train_dataset(data, seed=0), n)))
    # the same distribution, other clips: another seed of the synthetic set
    held_out_data = build_train_dataset(
        dataclasses.replace(data, options={**data.options, "seed": 12345}), seed=0)
    torch.manual_seed(0)
    untrained = build_model(**loaded.meta["model_config"]).eval()
    noise = np.random.default_rng(0).integers(
        0, 256, (n, data.num_frames, data.resolution, data.resolution, 3), dtype=np.uint8)
    sets = {
        "(a) held-out real clips": stats(list(real_clips(held_out_data, n))),
        "(b) trained model samples": stats(sampled_clips(loaded.model, loaded, n,
                                                         args.batch_size, 10_000)),
        "(c) untrained model samples": stats(sampled_clips(untrained, loaded, n,
                                                           args.batch_size, 10_000)),
        "(d) uniform noise": stats(noise),
    }
    results = {name: s.frechet_distance(reference) for name, s in sets.items()}
    print(f"offline Fréchet distance ({extractor.cache_name}, not comparable with published FVD) "
          f"to {n} training clips, {n} clips each; checkpoint step {loaded.step}")
    for name, value in results.items():
        print(f"  {name:30s} {value:10.3f}")
    values = list(results.values())
    print("ordered as expected:", all(a < b for a, b in zip(values, values[1:])))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
