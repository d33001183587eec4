"""Memory after long gaps: a Matten-Causal model trained on the panning-map set is given the
first half of a test clip (the camera's way out, real frames) and generates the second half
(the way back, following the real camera moves). Every generated frame of the way back shows a
place seen before, so its error against that earlier real frame, by gap length, measures what
the model remembers (the pairs of `matten.data.revisit_pairs`). Two references on the same clips: repeating
the last context frame (no memory at all) and uniform noise.

    python bench/long_memory.py --checkpoint runs/long [--clips 8 --frames 48]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from matten.config import config_from_dict
from matten.data import PanningMapDataset, revisit_pairs
from matten.diffusion import create_diffusion
from matten.long_video import iter_long
from matten.sampling import load_for_sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per chunk")
    parser.add_argument("--chunk-size", type=int, default=2)
    parser.add_argument("--bins", type=int, default=4)
    args = parser.parse_args()

    loaded = load_for_sampling(args.checkpoint)
    data = config_from_dict(loaded.meta["run_config"]).data
    options = {k: v for k, v in data.options.items() if k != "seed"}
    # test clips: seeds the training set never used, the out-and-back path (revisits by design)
    test = PanningMapDataset(args.clips, resolution=data.resolution, num_frames=args.frames,
                             seed=987_654, trajectory="out_and_back",
                             **{k: v for k, v in options.items() if k != "trajectory"})
    diffusion = create_diffusion(str(args.steps), diffusion_steps=loaded.diffusion_steps,
                                 learn_sigma=loaded.learn_sigma, prediction=loaded.prediction)
    half = args.frames // 2
    edges = np.linspace(1, args.frames, args.bins + 1)
    results: dict[str, list[tuple[int, float]]] = {"model": [], "repeat last frame": [],
                                                   "uniform noise": []}
    for i in range(args.clips):
        item = test[i]
        video, camera = item["video"], item["camera"].numpy()
        actions = item["actions"][None] if loaded.model.action_embedder is not None else None
        chunks = iter_long(loaded.model, diffusion, args.frames, args.chunk_size,
                           tuple(video.shape[:1]) + tuple(video.shape[2:]),
                           context=video[None, :, :half], actions=actions,
                           clip_denoised=True, generator=torch.Generator().manual_seed(i))
        generated = torch.cat([c.frames[0] for c in chunks], dim=1).clamp(-1, 1)
        candidates = {
            "model": generated,
            "repeat last frame": video[:, half - 1:half].expand(-1, args.frames - half, -1, -1),
            "uniform noise": torch.rand_like(generated) * 2 - 1,
        }
        # revisits whose later frame was generated: (earlier, later, gap)
        pairs = [p for p in revisit_pairs(camera, min_gap=1) if p[1] >= half]
        for name, later in candidates.items():
            full = torch.cat([video[:, :half], later], dim=1)
            for early, late, gap in pairs:
                err = (full[:, late] - full[:, early]).abs().mean().item()
                results[name].append((gap, err))

    def mean_by_bin(pairs):
        gaps, errs = np.array(pairs).T
        which = np.clip(np.digitize(gaps, edges) - 1, 0, len(edges) - 2)
        return [errs[which == b].mean() if (which == b).any() else float("nan")
                for b in range(len(edges) - 1)], np.bincount(which, minlength=len(edges) - 1)

    print(f"retrieval error (mean |pixel| in [-1, 1]) of the way back by gap, {args.clips} test "
          f"clips of {args.frames} frames, first {half} given; checkpoint step {loaded.step}, "
          f"window {loaded.model.config.get('window')}, memory {loaded.model.config.get('memory')}")
    gaps = [f"{int(a)}-{int(b) - 1}" for a, b in zip(edges[:-1], edges[1:])]
    print("| frames between visits | " + " | ".join(gaps) + " |")
    print("|---" * (len(gaps) + 1) + "|")
    report = {}
    for name, pairs in results.items():
        means, counts = mean_by_bin(pairs)
        report[name] = [float(m) for m in means]
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
