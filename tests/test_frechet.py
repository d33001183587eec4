"""Fréchet distance, feature statistics and their cache, and the self-trained motion feature net."""

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg

from matten.data import SyntheticVideoDataset
from matten.eval import motion_features as mn
from matten.eval.degradations import (
    DEGRADATIONS,
    add_noise,
    degrade,
    gaussian_blur,
    occlude,
    shuffle_frames,
)
from matten.eval.frechet import (
    FeatureStats,
    cached_stats,
    feature_stats_from_batches,
    frechet_distance,
    stats_cache_path,
)
from matten.eval.motion_features import (
    MotionFeatureExtractor,
    load_or_train_motion_net,
    motion_net_cache_paths,
)
from matten.eval.motion_net import MotionFeatureNet, MotionFeatureNetV2


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1] + (0.0 if rank else 0.1 * np.eye(d))


def reference_fd(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root, in float64."""
    covmean = linalg.sqrtm(s1.astype(np.float64) @ s2.astype(np.float64))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


# ----------------------------------------------------------------------------------------------
# frechet_distance


@pytest.mark.parametrize("d", [1, 4, 32])
def test_matches_scipy_reference_and_methods_agree(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    ref = reference_fd(mu1, s1, mu2, s2)
    eig = frechet_distance(mu1, s1, mu2, s2)
    sq = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert eig == pytest.approx(ref, rel=1e-6)
    assert sq == pytest.approx(ref, rel=1e-6)
    assert eig == pytest.approx(sq, rel=1e-6)
    # float32 and torch inputs are promoted to float64 rather than computed in low precision
    t = [torch.as_tensor(x, dtype=torch.float32) for x in (mu1, s1, mu2, s2)]
    ref32 = reference_fd(*[x.double().numpy() for x in t])
    assert frechet_distance(*t) == pytest.approx(ref32, rel=1e-6)


def test_same_gaussian_is_near_zero_and_shift_is_not():
    rng = np.random.default_rng(0)
    d, n = 8, 20000
    cov = random_spd(rng, d)
    chol = np.linalg.cholesky(cov)
    a = FeatureStats.from_features(rng.standard_normal((n, d)) @ chol.T)
    b = FeatureStats.from_features(rng.standard_normal((n, d)) @ chol.T)
    shifted = FeatureStats.from_features(rng.standard_normal((n, d)) @ chol.T + 0.5)
    same = a.frechet_distance(b)
    assert 0 <= same < 0.02
    assert a.frechet_distance(shifted) > 50 * same
    assert a.frechet_distance(shifted) == pytest.approx(d * 0.25, rel=0.1)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    d = 16
    cov = random_spd(rng, d)
    mu = rng.standard_normal(d)
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    for shift in (0.0, 0.5, 1.0, 2.0, 3.0):
        for method in ("eig", "sqrtm"):
            fd = frechet_distance(mu, cov, mu + shift * direction, cov, method=method)
            assert fd == pytest.approx(shift**2, abs=1e-8)


def test_symmetric():
    rng = np.random.default_rng(2)
    d = 24
    args = (rng.standard_normal(d), random_spd(rng, d), rng.standard_normal(d), random_spd(rng, d))
    fwd = frechet_distance(*args)
    back = frechet_distance(args[2], args[3], args[0], args[1])
    assert fwd == pytest.approx(back, rel=1e-10)


def test_singular_covariances_are_finite_and_non_negative():
    rng = np.random.default_rng(3)
    d = 32
    a = FeatureStats.from_features(rng.standard_normal((10, d)))  # N < D: rank 9
    b = FeatureStats.from_features(rng.standard_normal((12, d)) + 0.1)
    assert np.linalg.matrix_rank(a.cov) < d
    fd = a.frechet_distance(b)
    assert np.isfinite(fd) and fd >= 0
    assert 0 <= a.frechet_distance(a) < 1e-8 * np.trace(a.cov)
    low = random_spd(rng, d, rank=3)
    fd = frechet_distance(np.zeros(d), low, np.ones(d), random_spd(rng, d, rank=5))
    assert np.isfinite(fd) and fd >= d - 1e-9


def test_bad_shapes_raise():
    mu, cov = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(np.zeros((4, 1)), cov, mu, cov)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, cov, mu, np.eye(3))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(mu, np.zeros(4), mu, cov)
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(mu, cov, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, cov * np.nan, mu, cov)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, cov, mu, cov, method="svd")
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        FeatureStats.from_features(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(np.zeros((1, 5)))


# ----------------------------------------------------------------------------------------------
# statistics and cache


def test_batched_stats_equal_full_stats():
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((1000, 20)) * rng.uniform(0.1, 5, 20) + 100.0  # large offset
    full = FeatureStats.from_features(feats)
    cuts = [0, 1, 8, 100, 101, 500, 999, 1000]  # uneven, including batches of one
    batches = [feats[a:b] for a, b in itertools.pairwise(cuts)]
    batches[2] = torch.from_numpy(batches[2])  # torch batches work too
    acc = feature_stats_from_batches(iter(batches))
    assert acc.count == full.count == 1000
    np.testing.assert_allclose(acc.mean, full.mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(acc.cov, full.cov, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="dimension"):
        feature_stats_from_batches([feats[:5], feats[:5, :3]])


def test_stats_save_load_round_trip(tmp_path):
    stats = FeatureStats.from_features(np.random.default_rng(5).standard_normal((50, 6)))
    stats.key = {"dataset": "synthetic", "resolution": [16, 16]}
    path = stats.save(tmp_path / "sub" / "s.npz")
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    back = FeatureStats.load(path)
    np.testing.assert_array_equal(back.mean, stats.mean)
    np.testing.assert_array_equal(back.cov, stats.cov)
    assert back.count == 50 and back.key == stats.key
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
        FeatureStats.load(path)


KEY = {
    "dataset": "synthetic",
    "resolution": (16, 16),
    "num_frames": 8,
    "num_clips": 64,
    "extractor": "matten-motion-net-v1-abc",
}


def test_cached_stats_computes_once(tmp_path):
    rng = np.random.default_rng(6)
    calls = []

    def compute():
        calls.append(1)
        return rng.standard_normal((40, 5))  # features are turned into stats

    first = cached_stats(tmp_path, KEY, compute)
    second = cached_stats(tmp_path, dict(KEY, resolution=[16, 16]), compute)  # same key as JSON
    assert len(calls) == 1
    np.testing.assert_array_equal(first.cov, second.cov)
    assert second.key["num_clips"] == 64
    path = stats_cache_path(tmp_path, KEY)
    assert path.exists() and "synthetic" in path.name and "16x16" in path.name


def test_corrupt_cache_is_recomputed(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return FeatureStats(np.zeros(3), np.eye(3), 10)

    path = stats_cache_path(tmp_path, KEY)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00garbage")
    with pytest.warns(RuntimeWarning, match="recomputing"):
        stats = cached_stats(tmp_path, KEY, compute)
    assert len(calls) == 1 and stats.count == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_stats(tmp_path, KEY, compute)  # now valid: loaded silently
    assert len(calls) == 1


def test_different_key_uses_a_different_file(tmp_path):
    other = dict(KEY, num_clips=128)
    a, b = stats_cache_path(tmp_path, KEY), stats_cache_path(tmp_path, other)
    assert a != b
    assert stats_cache_path(tmp_path, dict(KEY, extractor="i3d")) != a
    calls = []

    def compute():
        calls.append(1)
        return FeatureStats(np.full(2, len(calls), float), np.eye(2), 5)

    assert cached_stats(tmp_path, KEY, compute).mean[0] == 1
    assert cached_stats(tmp_path, other, compute).mean[0] == 2
    # a file whose stored key does not match its name (e.g. copied by hand) is not trusted
    b.write_bytes(a.read_bytes())
    with pytest.warns(RuntimeWarning, match="different key"):
        assert cached_stats(tmp_path, other, compute).mean[0] == 3
    assert cached_stats(None, KEY, compute).mean[0] == 4  # no cache dir: always computed
    with pytest.raises(ValueError, match="JSON"):
        cached_stats(tmp_path, {"f": object()}, compute)


def test_cached_stats_keep_the_features_and_recompute_older_files_without_them(tmp_path):
    rng = np.random.default_rng(7)
    features = rng.standard_normal((30, 4))
    calls = []

    def compute():
        calls.append(1)
        return features

    stats = cached_stats(tmp_path, KEY, compute, need_features=True)
    again = cached_stats(tmp_path, KEY, compute, need_features=True)
    assert len(calls) == 1
    np.testing.assert_array_equal(again.features, features)
    np.testing.assert_array_equal(again.cov, stats.cov)
    # a file written before the features were kept: fine for FD, recomputed for KID
    old = FeatureStats(stats.mean, stats.cov, stats.count, key=stats.key)
    old.save(stats_cache_path(tmp_path, KEY))
    assert cached_stats(tmp_path, KEY, compute).features is None and len(calls) == 1
    with pytest.warns(RuntimeWarning, match="no features"):
        assert cached_stats(tmp_path, KEY, compute, need_features=True).features.shape == (30, 4)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="must return the features"):
        cached_stats(None, KEY, lambda: old, need_features=True)
    with pytest.raises(ValueError, match="shape"):
        FeatureStats(stats.mean, stats.cov, 29, features=features)


# ----------------------------------------------------------------------------------------------
# motion feature net


@pytest.mark.parametrize("shape", [(2, 3, 8, 16, 16), (3, 3, 16, 32, 32), (1, 3, 5, 20, 12)])
def test_motion_net_forward_shapes(shape):
    torch.manual_seed(0)
    net = MotionFeatureNet(feature_dim=64, num_classes=4)
    feats, logits = net(torch.rand(shape) * 2 - 1)
    assert feats.shape == (shape[0], 64) and logits.shape == (shape[0], 4)
    assert torch.isfinite(feats).all()
    with pytest.raises(ValueError, match="B, 3, F, H, W"):
        net(torch.zeros(2, 8, 16, 16))


# A small net, trained once for the module in a few seconds: 150 steps of 16 clips reach about
# 85-100% held-out accuracy on 4 classes, enough for features that separate real clips from noise.
# (The defaults, 300 steps of 32 clips, reach > 98% on 6 classes in about 30 s on one CPU core.)
SMALL = dict(
    resolution=16, num_frames=8, num_classes=4, steps=150, batch_size=16, num_val=48, version=1
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("motion_net")
    net, info = load_or_train_motion_net(cache, **SMALL)
    return cache, net, info


def test_short_training_reduces_loss(trained):
    _, net, info = trained
    losses = info["losses"]  # present after training (the JSON file leaves them out)
    assert len(losses) == SMALL["steps"] and not net.training
    assert np.mean(losses[-15:]) < 0.5 * np.mean(losses[:15])
    assert info["heldout_accuracy"] > 0.8  # 4 classes: chance is 0.25


def test_trained_net_is_cached_and_reused(trained, monkeypatch):
    cache, net, info = trained
    weights = sorted(cache.glob("*.safetensors"))
    meta = sorted(cache.glob("*.json"))
    assert len(weights) == 1 and len(meta) == 1
    saved = json.loads(meta[0].read_text())
    assert saved["settings"]["num_classes"] == 4 and "heldout_accuracy" in saved

    def no_training(*args, **kwargs):
        raise AssertionError("the cached net should have been reused")

    monkeypatch.setattr(mn, "train_motion_net", no_training)
    again, info2 = load_or_train_motion_net(cache, **SMALL)
    assert info2["heldout_accuracy"] == info["heldout_accuracy"]
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert MotionFeatureExtractor(again).weights_id == MotionFeatureExtractor(net).weights_id
    with pytest.raises(AssertionError, match="reused"):  # different settings: a new net
        load_or_train_motion_net(cache, **dict(SMALL, seed=1))


def test_damaged_net_cache_is_retrained(tmp_path):
    tiny = dict(resolution=16, num_frames=4, num_classes=2, steps=2, batch_size=4, num_val=4)
    load_or_train_motion_net(tmp_path, **tiny)
    (weights,) = tmp_path.glob("*.safetensors")
    weights.write_bytes(b"broken")
    with pytest.warns(RuntimeWarning, match="retraining"):
        net, _ = load_or_train_motion_net(tmp_path, **tiny)
    assert net(torch.zeros(1, 3, 4, 16, 16))[0].shape == (1, 128)
    with pytest.raises(TypeError, match="unknown"):
        load_or_train_motion_net(tmp_path, **tiny, colour=True)


def test_features_separate_real_clips_from_noise(trained):
    _, net, _ = trained
    extractor = MotionFeatureExtractor(net, batch_size=32)
    assert extractor.comparable_to_published is False
    assert extractor.name == "matten-motion-net-v1" and extractor.feature_dim == 128
    assert extractor.cache_name.startswith(extractor.name)

    def clips(seed, n=96):
        ds = SyntheticVideoDataset(n, 16, 8, num_classes=4, seed=seed)
        return torch.stack([ds[i]["video"] for i in range(n)])

    gen = torch.Generator().manual_seed(0)
    real_a, real_b = clips(0), clips(1)
    noise = torch.rand(real_a.shape, generator=gen) * 2 - 1
    frozen = real_b[:, :, :1].expand_as(real_b).contiguous()  # right frames, no motion
    fa, fb, fn, ff = (extractor(v) for v in (real_a, real_b, noise, frozen))
    assert fa.dtype == np.float64 and fa.shape == (96, 128)
    stats = [FeatureStats.from_features(f) for f in (fa, fb, fn, ff)]
    real_vs_real = stats[0].frechet_distance(stats[1])
    real_vs_noise = stats[0].frechet_distance(stats[2])
    real_vs_frozen = stats[0].frechet_distance(stats[3])
    assert real_vs_real < 0.2 * real_vs_noise
    assert real_vs_real < 0.2 * real_vs_frozen  # the features see motion, not just appearance
    np.testing.assert_allclose(extractor(real_a[:5]), fa[:5], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# version 2: trained to register degradations


def test_a_v1_net_cached_before_v2_keeps_its_file_name():
    """v1's settings, and so the cache files written before v2 existed, are unchanged."""
    defaults = dict(
        resolution=[16, 16],
        num_frames=8,
        num_classes=6,
        steps=300,
        seed=0,
        batch_size=32,
        lr=2e-3,
        feature_dim=128,
        width=16,
        max_objects=2,
        speed=[0.03, 0.1],
        num_val=240,
        augment=True,
        arch_version=1,
    )
    weights, _ = motion_net_cache_paths("cache", defaults)
    assert weights.name == "matten-motion-net-v1-r16x16-f8-c6-9e1d73d90e.safetensors"
    weights2, _ = motion_net_cache_paths("cache", dict(defaults, steps=400, version=2))
    assert weights2.name.startswith("matten-motion-net-v2-r16x16-f8-c6-")


def test_degradations():
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(2, 3, 8, 12, 12, generator=gen) * 2 - 1
    blurred = gaussian_blur(v, 1.0)
    assert blurred.shape == v.shape and blurred.std() < 0.7 * v.std()
    assert torch.allclose(blurred.mean(dim=(3, 4)), v.mean(dim=(3, 4)), atol=0.1)
    assert torch.equal(gaussian_blur(v, 0), v)
    noisy = add_noise(v, 0.2, gen)
    assert noisy.min() >= -1 and noisy.max() <= 1 and 0.1 < (noisy - v).abs().mean() < 0.2
    moved = shuffle_frames(v, 1.0, gen)  # every frame leaves its slot, none is lost
    for i in range(2):
        assert all(not torch.equal(moved[i, :, t], v[i, :, t]) for t in range(8))
        assert sorted(moved[i, 0, :, 0, 0].tolist()) == sorted(v[i, 0, :, 0, 0].tolist())
    covered = occlude(v, 0.25, gen)
    changed = (covered != v).any(dim=1).all(dim=1).float().mean(dim=(1, 2))  # still, every frame
    assert torch.allclose(changed, torch.full((2,), 0.25), atol=0.06)
    for kind in DEGRADATIONS:
        out = degrade(v, kind, 0.5, gen)
        assert out.shape == v.shape and torch.equal(out, v) == (kind == "clean")
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(v, "jpeg", 0.5, gen)


# 150 steps of 16 clips, as SMALL: about 10 s on one core.
SMALL_V2 = dict(SMALL, version=2)


@pytest.fixture(scope="module")
def trained_v2(trained):
    cache = trained[0]  # the same folder as the v1 net: the two must not collide
    net, info = load_or_train_motion_net(cache, **SMALL_V2)
    return cache, net, info


def test_v2_is_cached_under_its_own_name_beside_v1(trained, trained_v2, monkeypatch):
    cache, net, info = trained_v2
    assert isinstance(net, MotionFeatureNetV2) and info["name"] == "matten-motion-net-v2"
    assert sorted(p.name.split("-r16")[0] for p in cache.glob("*.safetensors")) == [
        "matten-motion-net-v1",
        "matten-motion-net-v2",
    ]
    v1, v2 = MotionFeatureExtractor(trained[1]), MotionFeatureExtractor(net)
    assert v2.name == "matten-motion-net-v2" and v2.cache_name.startswith("matten-motion-net-v2-")
    assert v1.cache_name != v2.cache_name and v2.feature_dim == 128
    assert info["heldout_accuracy"] > 0.6  # still learns the motion classes (chance: 0.25)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached net should have been reused")

    monkeypatch.setattr(mn, "train_motion_net", no_training)
    again, _ = load_or_train_motion_net(cache, **SMALL_V2)
    assert isinstance(again, MotionFeatureNetV2)
    assert MotionFeatureExtractor(again).weights_id == v2.weights_id
    with pytest.raises(ValueError, match="version"):
        load_or_train_motion_net(cache, **dict(SMALL_V2, version=3))


def test_v2_distance_grows_with_blur_and_noise(trained_v2):
    """FD to real clips rises at every step of 4 blur and 4 noise levels, from the held-out real
    clips' distance up."""
    extractor = MotionFeatureExtractor(trained_v2[1])

    def clips(seed, n=96):
        ds = SyntheticVideoDataset(n, 16, 8, num_classes=4, seed=seed)
        return torch.stack([ds[i]["video"] for i in range(n)])

    reference = FeatureStats.from_features(extractor(clips(0)))
    held_out = clips(1)

    def fd(videos):
        return FeatureStats.from_features(extractor(videos)).frechet_distance(reference)

    gen = torch.Generator().manual_seed(0)
    blur = [fd(held_out)] + [fd(gaussian_blur(held_out, s)) for s in (0.5, 1.0, 1.5, 2.0)]
    noise = [fd(held_out)] + [fd(add_noise(held_out, s, gen)) for s in (0.1, 0.2, 0.4, 0.8)]
    for series in (blur, noise):
        assert all(a < b for a, b in itertools.pairwise(series)), series
