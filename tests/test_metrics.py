"""KID, precision/recall and FD_inf against independent computations on known inputs."""

import itertools

import numpy as np
import pytest

from matten.eval.frechet import FeatureStats, frechet_distance
from matten.eval.metrics import (
    fd_infinity,
    kid,
    mmd2_unbiased,
    precision_recall,
    quality_metrics,
    sample_size_warning,
)


def loop_mmd2(x, y):
    """MMD^2_u written out pair by pair, straight from Gretton et al.'s definition, with KID's
    kernel k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]

    def k(a, b):
        return (sum(a[i] * b[i] for i in range(d)) / d + 1.0) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


# ----------------------------------------------------------------------------------------------
# KID


@pytest.mark.parametrize("n,m,d", [(7, 7, 3), (9, 5, 4)])
def test_mmd2_matches_the_pairwise_definition(n, m, d):
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal((n, d)), rng.standard_normal((m, d)) + 0.3
    assert mmd2_unbiased(x, y) == pytest.approx(loop_mmd2(x, y), rel=1e-10)


def test_kid_is_the_subset_average_of_the_unbiased_estimate():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((40, 6)), rng.standard_normal((30, 6)) * 1.3
    result = kid(x, y, num_subsets=5, subset_size=1000, seed=7)
    assert result.subset_size == 15 and result.num_subsets == 5  # half the smaller set
    draw = np.random.default_rng(7)  # the same subsets, drawn again here
    values = [
        loop_mmd2(x[draw.choice(40, 15, replace=False)], y[draw.choice(30, 15, replace=False)])
        for _ in range(5)
    ]
    assert result.mean == pytest.approx(np.mean(values), rel=1e-9)
    assert result.std_err == pytest.approx(np.std(values), rel=1e-9)


def test_kid_of_identical_sets_is_about_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 16))
    shifted = kid(x, x + 0.5)
    assert shifted.mean > 10 * shifted.std_err
    # Subsets of one set share points, whose k(x, x) terms the unbiased estimate leaves out on
    # one side only: slightly below 0, never a distance.
    assert abs(kid(x, x.copy()).mean) < 0.05 * shifted.mean
    # two independent samples of one distribution: 0 within the error
    same = kid(x, rng.standard_normal((400, 16)))
    assert abs(same.mean) < 3 * same.std_err and same.std_err < 0.05 * shifted.mean


def test_kid_std_err_matches_the_spread_of_repeated_evaluations():
    """The reported error should describe how much KID moves between independent samples."""
    rng = np.random.default_rng(3)
    means, errs = [], []
    for _ in range(30):
        x, y = rng.standard_normal((120, 8)), rng.standard_normal((120, 8)) * 1.1 + 0.3
        result = kid(x, y, num_subsets=40)
        means.append(result.mean)
        errs.append(result.std_err)
    assert 0.6 < np.mean(errs) / np.std(means) < 1.7


def test_kid_needs_enough_vectors():
    with pytest.raises(ValueError, match="at least 4"):
        kid(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="dimension"):
        kid(np.zeros((10, 2)), np.zeros((10, 3)))


# ----------------------------------------------------------------------------------------------
# precision / recall


def loop_precision_recall(real, fake, k):
    """Kynkäänniemi et al.'s definition with explicit loops and sorted distance lists."""

    def radii(points):
        return [sorted(np.linalg.norm(p - q) for q in points)[k] for p in points]

    def share(points, centres, r):
        return np.mean(
            [
                any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r, strict=True))
                for p in points
            ]
        )

    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def test_identical_sets_have_full_precision_and_recall():
    x = np.random.default_rng(4).standard_normal((50, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_disjoint_gaussians_have_no_precision_or_recall():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) + 6.0
    precision, recall = precision_recall(real, fake)
    assert precision < 0.02 and recall < 0.02


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_match_the_definition(k):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((40, 3))
    fake = np.concatenate(
        [
            rng.standard_normal((20, 3)) * 0.5,  # inside the real cloud
            rng.standard_normal((15, 3)) * 0.5 + 3.0,
        ]
    )  # beside it
    got = precision_recall(real, fake, k=k, batch_size=7)  # several row batches
    assert got == pytest.approx(loop_precision_recall(real, fake, k), abs=1e-12)
    # the narrow fake set covers only the real cloud's centre, and part of it lies outside
    assert 0.3 < got[0] < 0.8 and got[1] < 0.8


def test_mode_collapse_keeps_precision_but_loses_recall():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((300, 4))
    collapsed = rng.standard_normal((300, 4)) * 0.2  # samples only near the mode
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.4


# ----------------------------------------------------------------------------------------------
# FD_inf


def test_fd_infinity_removes_the_small_sample_bias():
    rng = np.random.default_rng(7)
    d, n = 48, 768  # bias ~ d / n: clearly above the sampling noise here
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    mu2 = np.full(d, 0.2)
    exact = frechet_distance(np.zeros(d), s1, mu2, s2)
    plain, extrapolated = [], []
    for _ in range(3):
        x = rng.multivariate_normal(np.zeros(d), s1, n)
        y = rng.multivariate_normal(mu2, s2, n)
        plain.append(FeatureStats.from_features(x).frechet_distance(FeatureStats.from_features(y)))
        result = fd_infinity(x, y)
        extrapolated.append(result.value)
        assert result.sizes[0] == 192 and result.sizes[-1] == n and result.slope > 0
    plain_bias, inf_bias = np.mean(plain) - exact, np.mean(extrapolated) - exact
    assert plain_bias > 0.04 * exact  # FD at 768 samples overestimates clearly ...
    assert abs(inf_bias) < 0.35 * plain_bias  # ... the extrapolation much less


def test_fd_infinity_refuses_subsets_no_larger_than_the_dimension():
    x = np.random.default_rng(8).standard_normal((128, 32))  # smallest subset: 32
    with pytest.raises(ValueError, match="larger than the feature dimension"):
        fd_infinity(x, x)
    assert np.isfinite(fd_infinity(x[:, :31], x[:, :31] + 1).value)


# ----------------------------------------------------------------------------------------------
# the report's fields


def test_sample_size_warning():
    assert sample_size_warning(2048, 400, i3d=True) is None
    assert "2048" in sample_size_warning(2047, 400, i3d=True)
    assert sample_size_warning(1280, 128) is None
    assert "1280" in sample_size_warning(1279, 128)


def test_quality_metrics_reports_what_it_can():
    rng = np.random.default_rng(9)
    real, fake = rng.standard_normal((300, 4)), rng.standard_normal((300, 4)) + 0.5
    report = quality_metrics(real, fake)
    assert set(report) >= {"fd", "fd_inf", "kid", "precision", "recall", "pr_k", "warning"}
    assert report["fd"] == pytest.approx(
        FeatureStats.from_features(real).frechet_distance(FeatureStats.from_features(fake))
    )
    assert report["kid"]["mean"] > 0 and report["warning"] is None
    assert abs(report["fd_inf"] - report["fd"]) < 0.2 * report["fd"]
    few = quality_metrics(real[:3], fake[:3])  # too few for most of them: said, not raised
    assert few["kid"] is None and few["precision"] is None and few["fd_inf"] is None
    assert "clips" in few["warning"] and few["notes"]
