"""`matten eval`: resumable sampling keyed by checkpoint and settings, cached real statistics,
the report and the comparison."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from matten import cli
from matten.config import load_config
from matten.data import SyntheticVideoDataset, read_video
from matten.eval import evaluate as evaluate_module
from matten.eval.evaluate import EvalSettings, clip_features, evaluate, real_clips
from matten.eval.frechet import FeatureStats
from matten.eval.motion_features import MotionFeatureExtractor
from matten.eval.motion_net import MotionFeatureNet
from matten.eval.samples import SamplesMismatchError, default_output, sample_key
from matten.training import train

TINY = [
    "model.depth=1",
    "model.hidden_size=32",
    "model.num_heads=2",
    "data.resolution=8",
    "data.num_frames=4",
    "data.num_videos=16",
    "train.batch_size=4",
    "train.max_steps=2",
    "sample.num_samples=2",
    "sample.steps=2",
    "train.cpu=true",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny class-conditional run with two checkpoints, steps 1 and 2."""
    out = tmp_path_factory.mktemp("eval") / "run"
    train(load_config("demo", TINY + ["train.checkpoint_every=1"]), output=out, progress=False)
    return out


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)  # an untrained net: a fixed random feature map is enough here
    return MotionFeatureExtractor(MotionFeatureNet(feature_dim=16, width=4))


def settings(**kw):
    return EvalSettings(**{"num_clips": 6, "batch_size": 2, "steps": 2, **kw})


def test_evaluation_resumes_without_resampling_finished_clips(
    run, extractor, tmp_path, monkeypatch
):
    full = evaluate(
        run, tmp_path / "full", settings=settings(), extractor=extractor, progress=False
    )
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
        evaluate(run, tmp_path / "part", settings=settings(), extractor=extractor, progress=False)
    assert sorted(p.name for p in (tmp_path / "part" / "generated").iterdir()) == [
        "key.json",
        "shard_00000.npz",
        "shard_00001.npz",
    ]
    calls.clear()
    resumed = evaluate(
        run, tmp_path / "part", settings=settings(), extractor=extractor, progress=False
    )
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
    again = evaluate(
        run, tmp_path / "part", settings=settings(), extractor=extractor, progress=False
    )
    assert calls == [1] and again["value"] == pytest.approx(full["value"], rel=1e-9)


def test_real_statistics_are_cached_and_the_report_is_written(
    run, extractor, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    first = evaluate(
        run,
        tmp_path / "a",
        settings=settings(),
        extractor=extractor,
        cache_dir=cache,
        progress=False,
    )
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and FeatureStats.load(files[0]).count == 6

    seen = []
    real_features = evaluate_module.clip_features
    monkeypatch.setattr(
        evaluate_module,
        "clip_features",
        lambda ex, clips: seen.append(len(clips)) or real_features(ex, clips),
    )
    second = evaluate(
        run,
        tmp_path / "b",
        settings=settings(),
        extractor=extractor,
        cache_dir=cache,
        progress=False,
    )
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
    feats = {
        name: np.concatenate([clip_features(extractor, c) for c in real_clips(ds, 64)])
        for name, ds in [("real", real), ("held_out", held_out)]
    }
    noise = np.random.default_rng(0).integers(0, 256, (64, 4, 8, 8, 3), dtype=np.uint8)
    feats["noise"] = clip_features(extractor, noise)
    stats = {k: FeatureStats.from_features(v) for k, v in feats.items()}
    assert stats["real"].frechet_distance(stats["held_out"]) < 0.2 * stats["real"].frechet_distance(
        stats["noise"]
    )


def test_eval_command(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        evaluate_module,
        "build_extractor",
        lambda *a, **k: MotionFeatureExtractor(MotionFeatureNet(16, width=4)),
    )
    code = cli.main(
        [
            "eval",
            "--checkpoint",
            str(run),
            "--output",
            str(tmp_path / "e"),
            "--num-clips",
            "4",
            "--batch-size",
            "2",
            "--steps",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert '"metric": "fd-matten-motion-net-v1"' in printed and "report.json" in printed
    assert "kid" in printed and "precision" in printed  # the summary line of the other metrics
    assert "warning: " in printed  # 4 clips are far too few for a Fréchet distance
    # other settings into the same folder: refused, naming them, unless --overwrite
    with pytest.raises(SystemExit):
        cli.main(
            [
                "eval",
                "--checkpoint",
                str(run),
                "--output",
                str(tmp_path / "e"),
                "--num-clips",
                "4",
                "--batch-size",
                "2",
                "--steps",
                "2",
                "--seed",
                "5",
            ]
        )
    err = capsys.readouterr().err
    assert "holds samples made with other settings (seed 0 -> 5)" in err and "--overwrite" in err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoint", str(run), "--num-clips", "1"])
    assert "--num-clips must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoint", str(run), "--set", "train.lr=1"])
    assert "data.KEY=VALUE" in capsys.readouterr().err


def shard_clips(folder) -> np.ndarray:
    return np.concatenate([np.load(p)["clips"] for p in sorted(folder.glob("shard_*.npz"))])


def test_two_checkpoints_of_a_run_get_their_own_samples_and_score(
    run, extractor, tmp_path, capsys, monkeypatch
):
    copy = tmp_path / "run"  # a copy: the shared run stays clean, and the keys survive copying
    shutil.copytree(run, copy)
    monkeypatch.setattr(evaluate_module, "build_extractor", lambda *a, **k: extractor)

    def eval_cli(checkpoint) -> dict:
        assert (
            cli.main(
                [
                    "eval",
                    "--checkpoint",
                    str(checkpoint),
                    "--num-clips",
                    "4",
                    "--batch-size",
                    "2",
                    "--steps",
                    "2",
                    "--no-progress",
                ]
            )
            == 0
        )
        report_path = capsys.readouterr().out.split("report: ")[1].split()[0]
        return json.loads(open(report_path).read())

    # the newest checkpoint first, then the older one: the order that reused the newer samples
    newer = eval_cli(copy)
    older = eval_cli(copy / "checkpoints" / "step_0000001")
    assert (newer["step"], older["step"]) == (2, 1)
    assert newer["shards_resumed"] == older["shards_resumed"] == 0
    folders = sorted(p.name for p in (copy / "eval").iterdir() if p.name != "cache")
    assert [name.split("-")[0] for name in folders] == ["step_0000001", "step_0000002"]
    assert (copy / "eval" / "cache").is_dir()  # real statistics shared by the run's evaluations
    assert not np.array_equal(
        shard_clips(copy / "eval" / folders[0] / "generated"),
        shard_clips(copy / "eval" / folders[1] / "generated"),
    )
    assert older["value"] != newer["value"]
    for report in (older, newer):  # the report and the folder record the key
        key = json.loads((Path(report["output"]) / "generated" / "key.json").read_text())
        assert report["samples_key"] == key and key["step"] == report["step"]
        assert key["seed"] == 0 and key["num_clips"] == 4 and key["batch_size"] == 2
    # the same checkpoint and settings again: the same folder, every shard reused
    again = eval_cli(copy / "checkpoints" / "step_0000001")
    assert again["output"] == older["output"] and again["shards_resumed"] == 2
    assert again["value"] == pytest.approx(older["value"], rel=1e-9)


def test_other_settings_never_reuse_samples(run, extractor, tmp_path):
    out = tmp_path / "e"
    first = evaluate(run, out, settings=settings(), extractor=extractor, progress=False)
    changes = {
        "cfg_scale": 3.0,
        "seed": 1,
        "steps": 3,
        "eta": 0.5,
        "batch_size": 3,
        "num_clips": 4,
        "sampler": "ddpm",
        "weights": "model",
    }
    for name, value in changes.items():
        with pytest.raises(SamplesMismatchError, match=rf"other settings \(.*{name} "):
            evaluate(
                run, out, settings=settings(**{name: value}), extractor=extractor, progress=False
            )
    # another checkpoint into the same folder
    with pytest.raises(SamplesMismatchError, match=r"step 2 -> 1.*weights_sha256"):
        evaluate(
            run / "checkpoints" / "step_0000001",
            out,
            settings=settings(),
            extractor=extractor,
            progress=False,
        )
    # the default folders differ whenever the key does
    base = sample_key(run / "checkpoints" / "step_0000002", "ema", 2, "ddim", 2.0, settings(), 4, 8)
    seeded = dict(base, seed=1)
    assert default_output(run / "checkpoints" / "step_0000002", base) != default_output(
        run / "checkpoints" / "step_0000002", seeded
    )
    # --overwrite: sampled again with the new settings
    redone = evaluate(
        run, out, settings=settings(seed=1), extractor=extractor, progress=False, overwrite=True
    )
    assert redone["shards_resumed"] == 0 and redone["samples_key"]["seed"] == 1
    assert redone["value"] != first["value"]
    # shards of an older layout, without key.json, are not trusted either
    (out / "generated" / "key.json").unlink()
    with pytest.raises(SamplesMismatchError, match="without a key.json"):
        evaluate(run, out, settings=settings(seed=1), extractor=extractor, progress=False)


def test_eval_on_a_missing_gpu_is_a_message(run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--checkpoint", str(run), "--device", "cuda", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is usable" in err and "Traceback" not in err


def test_the_report_gives_kid_precision_recall_and_warns_about_few_clips(run, extractor, tmp_path):
    report = evaluate(
        run, tmp_path / "e", settings=settings(num_clips=8), extractor=extractor, progress=False
    )
    saved = json.loads((tmp_path / "e" / "report.json").read_text())
    assert saved["value"] == saved["fd"] == pytest.approx(report["value"])
    assert saved["num_real_clips"] == saved["num_generated_clips"] == 8
    assert set(saved["kid"]) == {"mean", "std_err", "subset_size", "num_subsets"}
    assert saved["kid"]["subset_size"] == 4 and saved["kid"]["std_err"] >= 0
    assert 0 <= saved["precision"] <= 1 and 0 <= saved["recall"] <= 1 and saved["pr_k"] == 3
    # 8 clips of 16-d features: far too few for FD, and for FD_inf's subsets
    assert "8 clips for 16-dimensional features" in saved["warning"]
    assert saved["fd_inf"] is None and "FD_inf" in saved["metric_notes"][0]
    # the generated features are kept beside the report, and match the real ones' kind
    with np.load(tmp_path / "e" / "generated_features.npz") as data:
        assert data["features"].shape == (8, 16)
        assert str(data["extractor"]) == extractor.cache_name == saved["extractor"]


def test_the_default_extractor_is_the_motion_net_v2(tmp_path, monkeypatch):
    from matten.eval import motion_features, motion_net

    asked = []

    def fake_load_or_train(cache_dir, resolution, num_frames, **kwargs):
        asked.append(kwargs.get("version", motion_net.DEFAULT_VERSION))
        return motion_net.MotionFeatureNetV2(feature_dim=16, width=4), {}

    monkeypatch.setattr(motion_features, "load_or_train_motion_net", fake_load_or_train)
    extractor = evaluate_module.build_extractor(None, tmp_path, 8, 4)
    assert asked == [2] and extractor.name == "matten-motion-net-v2"
    old = evaluate_module.build_extractor(None, tmp_path, 8, 4, motion_net_version=1)
    assert asked == [2, 1] and old is not None


def test_evaluating_a_moving_digits_run(extractor, tmp_path):
    out = tmp_path / "digits"
    train(load_config("digits", TINY + ["data.num_videos=4"]), output=out, progress=False)
    report = evaluate(out, tmp_path / "e", settings=settings(), extractor=extractor, progress=False)
    assert report["data"]["name"] == "moving_digits" and np.isfinite(report["value"])
    (cached,) = (tmp_path / "e" / "cache").glob("*.npz")
    real = FeatureStats.load(cached)
    # num_videos (4) grown to one distinct clip each, as for the synthetic set
    assert real.key["num_videos"] == 6 and len(np.unique(real.features, axis=0)) == 6
    assert report["kid"] is not None and report["precision"] is not None


def test_eval_command_passes_the_motion_net_version(run, tmp_path, monkeypatch):
    asked = []

    def fake_build(*args, **kwargs):
        asked.append(kwargs.get("motion_net_version"))
        return MotionFeatureExtractor(MotionFeatureNet(16, width=4))

    monkeypatch.setattr(evaluate_module, "build_extractor", fake_build)
    assert (
        cli.main(
            [
                "eval",
                "--checkpoint",
                str(run),
                "--output",
                str(tmp_path / "e"),
                "--num-clips",
                "4",
                "--batch-size",
                "2",
                "--steps",
                "2",
                "--no-progress",
                "--motion-net-version",
                "1",
            ]
        )
        == 0
    )
    assert asked == [1]
