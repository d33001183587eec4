"""Evaluation: Fréchet distances (FVD with I3D, or the offline motion net), FLOPs and parameters.

The feature networks live in :mod:`.i3d` and :mod:`.motion_net`, the `matten eval` driver in
:mod:`.evaluate`; they import torch models lazily, so ``import matten.eval`` stays light.
"""

from .flops import (
    PAPER_FLOPS_G,
    PAPER_PARAMS_M,
    analytic_flops,
    count_parameters,
    counted_flops,
    flops_report,
    thop_style_macs,
)
from .frechet import (
    FeatureStats,
    FeatureStatsAccumulator,
    cached_stats,
    feature_stats_from_batches,
    frechet_distance,
)

__all__ = [
    "FeatureStats",
    "FeatureStatsAccumulator",
    "PAPER_FLOPS_G",
    "PAPER_PARAMS_M",
    "analytic_flops",
    "cached_stats",
    "count_parameters",
    "counted_flops",
    "feature_stats_from_batches",
    "flops_report",
    "frechet_distance",
    "thop_style_macs",
]
