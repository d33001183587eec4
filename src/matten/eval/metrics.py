"""Sample-quality estimators beside the Fréchet distance, all computed on feature vectors.

* :func:`kid` -- the Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of
  the squared MMD with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
  random subsets as torch-fidelity and clean-fid do, with the spread over subsets as its error.
  Unlike FD it is unbiased at any sample size, so small evaluations are not skewed upwards.
* :func:`precision_recall` -- improved precision and recall (Kynkäänniemi et al. 2019): each set
  is a union of balls reaching each point's k-th nearest neighbour; precision is the share of
  generated points inside the real balls (fidelity), recall the share of real points inside the
  generated balls (coverage).
* :func:`fd_infinity` -- FD extrapolated to infinitely many samples (Chong & Forsyth 2020): FD
  falls roughly like ``FD_inf + c / N`` with the sample count N, so a line fitted to FD at several
  subset sizes against ``1/N`` has FD_inf as its intercept.
* :func:`sample_size_warning` -- when FD at a given clip count is not to be trusted.

Everything is float64 numpy; features are ``(N, D)`` arrays (torch tensors are accepted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .frechet import FeatureStats, _as_float64

__all__ = [
    "KID",
    "FDInfinity",
    "fd_infinity",
    "kid",
    "mmd2_unbiased",
    "polynomial_kernel",
    "precision_recall",
    "quality_metrics",
    "sample_size_warning",
    "I3D_PROTOCOL_CLIPS",
    "CLIPS_PER_DIM",
]

# Published FVD uses 2048 clips (StyleGAN-V); at other counts its bias differs, so the numbers are
# not comparable with papers.
I3D_PROTOCOL_CLIPS = 2048
# FD needs a (D, D) covariance: D (D + 1) / 2 numbers from N samples. Below N = D it is singular;
# at N = 10 D the largest and smallest sample eigenvalues of a white covariance still stray by
# about 1 +- 2 sqrt(D / N) = 1 +- 0.6 (Marchenko-Pastur), and FD's bias (~ D / N) is of the order
# of the distances between decent models. Ten clips per dimension is the least we call reliable.
CLIPS_PER_DIM = 10


def _features(x, what: str) -> np.ndarray:
    arr = _as_float64(x, what)
    if arr.ndim != 2:
        raise ValueError(f"{what} must have shape (N, D), got {arr.shape}")
    return arr


def _pair(real, fake) -> tuple[np.ndarray, np.ndarray]:
    real, fake = _features(real, "real features"), _features(fake, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real features have dimension {real.shape[1]}, generated features {fake.shape[1]}"
        )
    return real, fake


# ----------------------------------------------------------------------------------------------
# KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel matrix ``(x_i . y_j / d + 1)^3`` for ``x`` (n, d) and ``y`` (m, d)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased estimate of MMD^2 between the distributions of ``x`` (n, d) and ``y`` (m, d):

        sum_{i != j} k(x_i, x_j) / (n (n-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
        - 2 sum_{i, j} k(x_i, y_j) / (n m)

    (the diagonals k(x_i, x_i) are left out, which is what removes the bias). It can be slightly
    negative when the distributions are equal.
    """
    x, y = _pair(x, y)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {n} and {m}")
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    k_xy = polynomial_kernel(x, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (n * (n - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


@dataclass
class KID:
    """KID as the mean over ``num_subsets`` subsets of ``subset_size`` per side, and ``std_err``:
    the standard deviation of the subset estimates (torch-fidelity's ``kid_std``)."""

    mean: float
    std_err: float
    subset_size: int
    num_subsets: int

    def as_dict(self) -> dict:
        return asdict(self)


def kid(real, fake, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """KID between ``real`` and ``fake`` features, over random subsets drawn without replacement.

    The subset size is ``subset_size`` (1000, as torch-fidelity and clean-fid) but at most half of
    the smaller set. With subsets of half the data their spread is a fair standard error of the
    whole estimate (half-sampling: a half-subset's estimate varies about twice as much as a
    full-sample one, and drawing it from a fixed set of twice its size halves that variance
    again); with subsets as large as the data every subset is the same set and the spread would
    be 0. Every subset is unbiased, so the subset size changes the error, never the expected
    value.
    """
    real, fake = _pair(real, fake)
    if num_subsets < 2:
        raise ValueError(f"num_subsets must be >= 2 for a spread, got {num_subsets}")
    size = min(int(subset_size), len(real) // 2, len(fake) // 2)
    if size < 2:
        raise ValueError(
            f"KID needs at least 4 real and 4 generated feature vectors, got "
            f"{len(real)} and {len(fake)}"
        )
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(
                real[rng.choice(len(real), size, replace=False)],
                fake[rng.choice(len(fake), size, replace=False)],
            )
            for _ in range(num_subsets)
        ]
    )
    return KID(float(values.mean()), float(values.std()), size, int(num_subsets))


# ----------------------------------------------------------------------------------------------
# precision and recall


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)  # round-off can make a zero distance slightly negative


def _kth_neighbour_radii(x: np.ndarray, k: int, batch: int) -> np.ndarray:
    """Squared distance from each point of ``x`` to its k-th nearest other point of ``x``."""
    radii = np.empty(len(x))
    for lo in range(0, len(x), batch):
        d = _squared_distances(x[lo : lo + batch], x)
        # Column 0 of the sorted row is the point itself (distance 0), so index k is the k-th
        # nearest *other* point, as in the authors' code.
        radii[lo : lo + batch] = np.partition(d, k, axis=1)[:, k]
    return radii


def _inside_share(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch: int) -> float:
    """Share of ``points`` within at least one ball (``centres``, squared ``radii``)."""
    inside = 0
    for lo in range(0, len(points), batch):
        d = _squared_distances(points[lo : lo + batch], centres)
        inside += int((d <= radii[None, :]).any(axis=1).sum())
    return inside / len(points)


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of ``fake`` against ``real`` (Kynkäänniemi et al. 2019).

    The real manifold is the union of balls around each real point with radius its distance to
    its ``k``-th nearest real neighbour; precision is the share of generated points inside it.
    Recall swaps the roles. Distances are Euclidean in the feature space; ``batch_size`` rows of
    the distance matrix are held at a time.
    """
    real, fake = _pair(real, fake)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} real and {k} generated "
            f"feature vectors, got {len(real)} and {len(fake)}"
        )
    precision = _inside_share(fake, real, _kth_neighbour_radii(real, k, batch_size), batch_size)
    recall = _inside_share(real, fake, _kth_neighbour_radii(fake, k, batch_size), batch_size)
    return precision, recall


# ----------------------------------------------------------------------------------------------
# FD extrapolated to infinite samples


@dataclass
class FDInfinity:
    """The extrapolated distance ``value`` (the fit's intercept; it can fall slightly below 0
    when the two sets come from one distribution), the fitted ``slope`` in 1/N, and the subset
    sizes with their mean FDs."""

    value: float
    slope: float
    sizes: list[int]
    fds: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def fd_infinity(
    real, fake, num_points: int = 8, min_fraction: float = 0.25, repeats: int = 3, seed: int = 0
) -> FDInfinity:
    """FD extrapolated to infinitely many samples (Chong & Forsyth 2020, "FID_inf").

    FD is computed on random subsets of N real and N generated vectors for ``num_points`` sizes N
    evenly spaced from ``min_fraction`` of the smaller set up to all of it (``repeats`` draws per
    size, averaged), a line is fitted to FD against 1/N by least squares, and its intercept is
    the estimate for N -> infinity. Both sides are subsampled because both sides' covariance
    estimates add bias (Chong & Forsyth kept a large real set fixed). The 1/N law is the first
    term of an expansion in D / N, so the smallest subset must hold more vectors than there are
    dimensions D (on Gaussians, subsets down to N = 1.06 D still remove about 95% of the bias).
    """
    real, fake = _pair(real, fake)
    n, dim = min(len(real), len(fake)), real.shape[1]
    if num_points < 2 or repeats < 1 or not 0 < min_fraction < 1:
        raise ValueError("fd_infinity needs num_points >= 2, repeats >= 1 and 0 < min_fraction < 1")
    smallest = int(np.ceil(min_fraction * n))
    if smallest <= dim:
        raise ValueError(
            f"FD_inf needs subsets larger than the feature dimension ({dim}); "
            f"{min_fraction:g} of {n} clips is {smallest}"
        )
    sizes = sorted(set(np.linspace(smallest, n, num_points).round().astype(int).tolist()))
    rng = np.random.default_rng(seed)
    fds = []
    for size in sizes:
        draws = 1 if size == n else repeats  # the whole set is the same set every time
        fds.append(
            float(
                np.mean(
                    [
                        FeatureStats.from_features(
                            real[rng.choice(len(real), size, replace=False)]
                        ).frechet_distance(
                            FeatureStats.from_features(
                                fake[rng.choice(len(fake), size, replace=False)]
                            )
                        )
                        for _ in range(draws)
                    ]
                )
            )
        )
    slope, intercept = np.polyfit(1.0 / np.asarray(sizes, float), np.asarray(fds), 1)
    return FDInfinity(float(intercept), float(slope), sizes, fds)


# ----------------------------------------------------------------------------------------------
# when FD is not to be trusted


def sample_size_warning(num_clips: int, feature_dim: int, i3d: bool = False) -> str | None:
    """A sentence saying why FD at ``num_clips`` clips is not reliable, or None.

    FVD with I3D follows the published protocol, so anything under 2048 clips is flagged as not
    comparable with papers. In any feature space, fewer than ``CLIPS_PER_DIM`` clips per feature
    dimension leave the covariance too poorly estimated: FD is then biased upwards by an amount
    that depends on the clip count, so compare only evaluations with the same count (KID and
    FD_inf do not share that bias).
    """
    if i3d:
        if num_clips >= I3D_PROTOCOL_CLIPS:
            return None
        return (
            f"{num_clips} clips: FVD is computed with {I3D_PROTOCOL_CLIPS} clips in published "
            "work and is biased upwards at fewer, so this value is not comparable with them; "
            "compare KID, or only evaluations with the same clip count"
        )
    needed = CLIPS_PER_DIM * int(feature_dim)
    if num_clips < needed:
        return (
            f"{num_clips} clips for {feature_dim}-dimensional features: FD needs about "
            f"{needed} ({CLIPS_PER_DIM} per dimension) to be reliable and is biased upwards "
            "below that, so compare KID (unbiased), or only evaluations with the same clip "
            "count"
        )
    return None


# ----------------------------------------------------------------------------------------------
# everything at once


def quality_metrics(
    real,
    fake,
    fd: float | None = None,
    i3d: bool = False,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict:
    """FD, FD_inf, KID, precision and recall of ``fake`` against ``real`` features, as report
    fields, plus ``warning`` (:func:`sample_size_warning`, or None).

    ``fd`` is the plain Fréchet distance when the caller has it already (else it is computed
    here). A metric the clip count does not allow (e.g. FD_inf with too few clips per
    dimension) is None, and ``notes`` says why.
    """
    real, fake = _pair(real, fake)
    if fd is None:
        fd = FeatureStats.from_features(real).frechet_distance(FeatureStats.from_features(fake))
    report: dict[str, Any]
    report = {
        "fd": float(fd),
        "fd_inf": None,
        "fd_inf_fit": None,
        "kid": None,
        "precision": None,
        "recall": None,
        "pr_k": int(k),
        "num_real_clips": len(real),
        "num_generated_clips": len(fake),
        "warning": sample_size_warning(min(len(real), len(fake)), real.shape[1], i3d),
        "notes": [],
    }
    try:
        inf = fd_infinity(real, fake, seed=seed)
        report["fd_inf"] = inf.value
        report["fd_inf_fit"] = {k_: v for k_, v in inf.as_dict().items() if k_ != "value"}
    except ValueError as exc:
        report["notes"].append(f"no FD_inf: {exc}")
    try:
        report["kid"] = kid(real, fake, kid_subsets, kid_subset_size, seed).as_dict()
    except ValueError as exc:
        report["notes"].append(f"no KID: {exc}")
    try:
        report["precision"], report["recall"] = precision_recall(real, fake, k)
    except ValueError as exc:
        report["notes"].append(f"no precision/recall: {exc}")
    return report
