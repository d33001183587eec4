"""Fréchet distance between Gaussians fitted to features (the math behind FID/FVD), and the
feature statistics it is computed from, with an on-disk cache.

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

Everything is computed in float64: the trace term is a small difference of large numbers, and
float32 loses most of it for 400-dimensional I3D features.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import atomic_write_path

__all__ = [
    "FeatureStats",
    "FeatureStatsAccumulator",
    "cached_stats",
    "feature_stats_from_batches",
    "frechet_distance",
    "stats_cache_path",
]

_STATS_FORMAT = 1  # bump when the .npz layout changes; older files are then recomputed


# ----------------------------------------------------------------------------------------------
# the distance


def _as_float64(x, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric array: {exc}") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _check_gaussian(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = _as_float64(mu, f"mu{which}")
    sigma = _as_float64(sigma, f"sigma{which}")
    if mu.ndim != 1 or mu.shape[0] < 1:
        raise ValueError(f"mu{which} must be a 1-D mean vector of shape (D,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(
            f"sigma{which} must be a ({d}, {d}) covariance matrix to match "
            f"mu{which} of shape ({d},), got shape {sigma.shape}"
        )
    return mu, sigma


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) become 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eig(s1: np.ndarray, s2: np.ndarray) -> float:
    # Tr((S1 S2)^{1/2}) = Tr((A S2 A)^{1/2}) with A = S1^{1/2}: S1 S2 is similar to A S2 A, which
    # is symmetric PSD, so its eigenvalues are real and >= 0 (clipping only removes round-off).
    # This stays well defined for singular covariances (fewer samples than dimensions), where
    # sqrtm(S1 S2) is ill-conditioned.
    a = _sym_sqrt(s1)
    m = a @ s2 @ a
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    # The classic FID recipe (pytorch-fid / TTUR): sqrtm of the non-symmetric product, retried
    # with eps on the diagonals when it fails, and a numerically imaginary part dropped.
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matrix is singular" is handled by the retry below
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError(
            "sqrtm of the covariance product is not finite even with an eps offset; "
            "use method='eig'"
        )
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        scale = max(1.0, float(np.abs(np.diagonal(covmean).real).max()))
        if imag > 1e-3 * scale:
            raise ValueError(
                f"sqrtm of the covariance product has a large imaginary component "
                f"({imag:.3g}); the covariances are probably not PSD. Use "
                "method='eig'"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eig", eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``method="eig"`` (default) takes the square root via symmetric eigen-decompositions, which is
    stable and symmetric in its arguments even for rank-deficient covariances. ``method="sqrtm"``
    reproduces the usual FID code path (``scipy.linalg.sqrtm(sigma1 @ sigma2)``), retrying with
    ``eps`` added to the diagonals when the result is not finite. Both agree on well-conditioned
    inputs. The result is clipped at 0 (tiny negative values are round-off).
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"the two Gaussians have different dimensions: mu1 {mu1.shape} vs mu2 {mu2.shape}"
        )
    # Covariances estimated from data are symmetric up to round-off; eigh assumes exact symmetry.
    sigma1 = (sigma1 + sigma1.T) / 2.0
    sigma2 = (sigma2 + sigma2.T) / 2.0
    if method == "eig":
        tr_covmean = _trace_sqrt_product_eig(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"unknown method {method!r}; use 'eig' or 'sqrtm'")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(value, 0.0)


# ----------------------------------------------------------------------------------------------
# statistics


@dataclass
class FeatureStats:
    """Mean (D,), covariance (D, D) (unbiased, as ``np.cov``) and sample count of features, and
    optionally the features themselves (N, D), which KID and precision/recall need."""

    mean: np.ndarray
    cov: np.ndarray
    count: int
    key: dict | None = field(default=None, compare=False)  # what the stats describe (cache key)
    features: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        self.mean, self.cov = _check_gaussian(self.mean, self.cov, "")
        self.count = int(self.count)
        if self.features is not None:
            self.features = _as_float64(self.features, "features")
            if self.features.shape != (self.count, self.dim):
                raise ValueError(
                    f"features must have shape ({self.count}, {self.dim}) to match "
                    f"the stats, got {self.features.shape}"
                )

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        """Fit a Gaussian to ``features`` of shape (N, D), N >= 2 (kept in ``.features``)."""
        x = _as_float64(features, "features")
        if x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {x.shape}")
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
        return cls(
            x.mean(axis=0),
            np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]),
            x.shape[0],
            features=x,
        )

    def frechet_distance(self, other: FeatureStats, method: str = "eig") -> float:
        return frechet_distance(self.mean, self.cov, other.mean, other.cov, method=method)

    def save(self, path) -> Path:
        """Write an ``.npz`` atomically (an existing file is replaced only once this one is
        complete, so an interrupted run never leaves a truncated cache behind). The features go
        in too when present: an extra array, which readers without it ignore."""
        path = Path(path)
        key_json = json.dumps(self.key, sort_keys=True) if self.key is not None else ""
        extra: dict[str, Any] = {} if self.features is None else {"features": self.features}
        with atomic_write_path(path) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
                np.savez(
                    f,
                    mean=self.mean,
                    cov=self.cov,
                    count=np.int64(self.count),
                    key=np.array(key_json),
                    format=np.int64(_STATS_FORMAT),
                    **extra,
                )
        return path

    @classmethod
    def load(cls, path) -> FeatureStats:
        """Read a file written by :meth:`save`; raises ``ValueError`` if it is damaged."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                fmt = int(data["format"]) if "format" in data.files else None
                if fmt != _STATS_FORMAT:
                    raise ValueError(f"stats format {fmt}, expected {_STATS_FORMAT}")
                mean, cov, count = data["mean"], data["cov"], int(data["count"])
                key_json = str(data["key"]) if "key" in data.files else ""
                features = data["features"] if "features" in data.files else None
            key = json.loads(key_json) if key_json else None
            return cls(mean, cov, count, key=key, features=features)
        except FileNotFoundError:
            raise
        except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            raise ValueError(f"cannot read feature stats '{path}': {exc}") from None


class FeatureStatsAccumulator:
    """Running mean/covariance over batches of features, without keeping the features.

    Batches are merged with Chan et al.'s pairwise update (per-batch centred sums), which keeps
    float64 precision where a naive sum of x x^T would cancel catastrophically.
    """

    def __init__(self):
        self.count = 0
        self.mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of deviations from the mean

    def update(self, features) -> FeatureStatsAccumulator:
        x = _as_float64(features, "features")
        if x.ndim != 2:
            raise ValueError(f"a feature batch must have shape (B, D), got {x.shape}")
        n_b = x.shape[0]
        if n_b == 0:
            return self
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"feature batch has dimension {x.shape[1]}, earlier batches had "
                f"{self.mean.shape[0]}"
            )
        mean_b = x.mean(axis=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        if self.mean is None:
            self.count, self.mean, self._m2 = n_b, mean_b, m2_b
            return self
        n = self.count + n_b
        delta = mean_b - self.mean
        self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n
        return self

    def stats(self) -> FeatureStats:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        assert self.mean is not None and self._m2 is not None  # set by the first update
        return FeatureStats(self.mean.copy(), self._m2 / (self.count - 1), self.count)


def feature_stats_from_batches(batches: Iterable) -> FeatureStats:
    """:class:`FeatureStats` of the concatenation of ``(B, D)`` batches (numpy or torch)."""
    acc = FeatureStatsAccumulator()
    for batch in batches:
        acc.update(batch)
    return acc.stats()


# ----------------------------------------------------------------------------------------------
# cache

# Key fields that make a cache file name readable, in this order; the hash covers the whole key.
_SLUG_FIELDS = (
    "dataset",
    "split",
    "resolution",
    "num_frames",
    "frames",
    "num_clips",
    "num_videos",
    "extractor",
)


def _canonical_key(key: dict) -> dict:
    if not isinstance(key, dict) or not key:
        raise ValueError(f"the stats cache key must be a non-empty dict, got {key!r}")
    try:
        # A JSON round trip makes tuples and lists (and int-like keys) compare equal after loading.
        return json.loads(json.dumps(key, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the stats cache key must be JSON-serialisable: {exc}") from None


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = "x".join(str(v) for v in value)
    return re.sub(r"[^a-z0-9.]+", "-", str(value).lower()).strip("-.")


def stats_cache_path(cache_dir, key: dict) -> Path:
    """``cache_dir/<readable slug>-<12 hex of sha256(key)>.npz`` for a key dict."""
    key = _canonical_key(key)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    parts = [_slug(key[k]) for k in _SLUG_FIELDS if k in key]
    slug = "-".join(p for p in parts if p)[:80].strip("-") or "stats"
    return Path(cache_dir) / f"{slug}-{digest}.npz"


def cached_stats(
    cache_dir, key: dict, compute: Callable[[], Any], need_features: bool = False
) -> FeatureStats:
    """Load the stats for ``key`` from ``cache_dir``, or ``compute()`` and store them.

    ``compute`` returns a :class:`FeatureStats` or an (N, D) feature array. The key (dataset,
    resolution, frames, number of clips, extractor name, ...) is hashed into the file name and
    also stored in the file; a file that cannot be read or whose stored key differs is recomputed
    with a warning instead of failing the evaluation. With ``need_features`` the features are
    cached too, and a file without them (written before they were kept) is recomputed.
    ``cache_dir=None`` disables the cache.
    """
    canonical = _canonical_key(key)
    path = stats_cache_path(cache_dir, canonical) if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            stats = FeatureStats.load(path)
            if stats.key != canonical:
                warnings.warn(
                    f"feature stats cache '{path}' was written for a different key "
                    f"({stats.key}); recomputing",
                    RuntimeWarning,
                    stacklevel=2,
                )
            elif need_features and stats.features is None:
                warnings.warn(
                    f"feature stats cache '{path}' holds no features (an older file); recomputing",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                return stats
        except ValueError as exc:
            warnings.warn(f"{exc}; recomputing", RuntimeWarning, stacklevel=2)
    result = compute()
    stats = result if isinstance(result, FeatureStats) else FeatureStats.from_features(result)
    if need_features and stats.features is None:
        raise ValueError(
            "compute() must return the features (an (N, D) array, or stats with "
            "features) when need_features is set"
        )
    stats.key = canonical
    if path is not None:
        stats.save(path)
    return stats
