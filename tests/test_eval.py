"""`matten eval`: resumable sampling, cached real statistics, the report and the comparison."""

import json

import numpy as np
import pytest
import torch

from matten import cli
from matten.config import load_config
from matten.data import SyntheticVideoDataset, read_video
from matten.eval import evaluate as evaluate_module
from matten.eval.evaluate import EvalSettings, clip_features, evaluate, real_clips
from matten.eval.frechet import FeatureStats
from matten.eval.motion_net import MotionFeatureExtractor, MotionFeatureNet
from matten.training import train

TINY = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.resolution=8",
        "data.num_frames=4", "data.num_videos=16", "train.batch_size=4", "train.max_steps=2",
        "sample.num_samples=2", "sample.steps=2", "train.cpu=true"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    train(load_config("demo", TINY), output=out, progress=False)
    return out


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)  # an untrained net: a fixed random feature map is enough here
    return MotionFeatureExtractor(MotionFeatureNet(feature_dim=16, width=4))


def settings(**kw):
    return EvalSettings(**{"num_clips": 6, "batch_size": 2, "steps": 2, **kw})


def test_evaluation_resumes_without_resampling_finished_clips(run, extractor, tmp_path,
                                                              monkeypatch):
    full = evaluate(run, tmp_path / "full", settings=settings(), extractor=extractor,
                    progress=False)
    assert full["shards_total"] == 3 and full["shards_resumed"] == 0
    assert full["metric"] == "fd-matten-motion-net-v1" and full["value"] > 0
    assert not full["comparable_to_published_fvd"] and "not comparable" in full["note"]

    real_sample = evaluate_module._sample_shard
    calls, crashed = [], []

    def crash_on_third(loaded, shard, *args):
        calls.append(shard)
        if shard == 2 and not crashed:
            crashed.append(shard)
            raise RuntimeError("interrupted")  # the evaluation stops part-way
        return real_sample(loaded, shard, *args)

    monkeypatch.setattr(evaluate_module, "_sample_shard", crash_on_third)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate(run, tmp_path / "part", settings=settings(), extractor=extractor,
                 progress=False)
    assert sorted(p.name for p in (tmp_path / "part" / "generated").iterdir()) == \
        ["shard_00000.npz", "shard_00001.npz"]
    calls.clear()
    resumed = evaluate(run, tmp_path / "part", settings=settings(), extractor=extractor,
                       progress=False)
    assert calls == [2]  # only the missing clips were sampled
    assert resumed["shards_resumed"] == 2
    # the clips are a function of (seed, shard), so the result equals the uninterrupted run's
    assert resumed["value"] == pytest.approx(full["value"], rel=1e-9)
    for shard in range(3):
        a = np.load(tmp_path / "full" / "generated" / f"shard_{shard:05d}.npz")["clips"]
        b = np.load(tmp_path / "part" / "generated" / f"shard_{shard:05d}.npz")["clips"]
        assert np.array_equal(a, b)
    # a damaged shard is sampled again
    (tmp_path / "part" / "generated" / "shard_00001.npz").write_bytes(b"torn")
    calls.clear()
    again = evaluate(run, tmp_path / "part", settings=settings(), extractor=extractor,
                     progress=False)
    assert calls == [1] and again["value"] == pytest.approx(full["value"], rel=1e-9)


def test_real_statistics_are_cached_and_the_report_is_written(run, extractor, tmp_path,
                                                              monkeypatch):
    cache = tmp_path / "cache"
    first = evaluate(run, tmp_path / "a", settings=settings(), extractor=extractor,
                     cache_dir=cache, progress=False)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and FeatureStats.load(files[0]).count == 6

    seen = []
    real_features = evaluate_module.clip_features
    monkeypatch.setattr(evaluate_module, "clip_features",
                        lambda ex, clips: seen.append(len(clips)) or real_features(ex, clips))
    second = evaluate(run, tmp_path / "b", settings=settings(), extractor=extractor,
                      cache_dir=cache, progress=False)
    assert second["value"] == pytest.approx(first["value"], rel=1e-9)
    assert sum(seen) == 6  # only the generated clips went through the network
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["num_clips"] == 6 and report["step"] == 2 and report["value"] == second["value"]
    # the comparison video: 2 rows (real, generated) of 6 clips, 4 frames
    frames = read_video(tmp_path / "b" / "comparison.gif")
    assert frames.shape[0] == 4


def test_fd_separates_real_clips_from_noise(extractor):
    real = SyntheticVideoDataset(64, resolution=8, num_frames=4, num_classes=4, seed=0)
    held_out = SyntheticVideoDataset(64, resolution=8, num_frames=4, num_classes=4, seed=1)
    feats = {name: np.concatenate([clip_features(extractor, c) for c in real_clips(ds, 64)])
             for name, ds in [("real", real), ("held_out", held_out)]}
    noise = np.random.default_rng(0).integers(0, 256, (64, 4, 8, 8, 3), dtype=np.uint8)
    feats["noise"] = clip_features(extractor, noise)
    stats = {k: FeatureStats.from_features(v) for k, v in feats.items()}
    assert stats["real"].frechet_distance(stats["held_out"]) < \
        0.2 * stats["real"].frechet_distance(stats["noise"])


def test_eval_command(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate_module, "build_extractor",
                        lambda *a, **k: MotionFeatureExtractor(MotionFeatureNet(16, width=4)))
    code = cli.main(["eval", "--checkpoint", str(run), "--output", str(tmp_path / "e"),
                     "--num-clips", "4", "--batch-size", "2", "--steps", "2", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert '"metric": "fd-matten-motion-net-v1"' in printed and "report.json" in printed
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoint", str(run), "--num-clips", "1"])
    assert "--num-clips must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoint", str(run), "--set", "train.lr=1"])
    assert "data.KEY=VALUE" in capsys.readouterr().err
