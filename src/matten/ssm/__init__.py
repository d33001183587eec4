"""The state-space core: selective scan kernels, Mamba and bidirectional Mamba, scan orders."""

from .mamba import BiMamba, Mamba, MambaState, SelectiveSSM
from .scan_order import (
    TokenGrid,
    global_to_grid,
    global_to_spatial,
    global_to_temporal,
    grid_to_global,
    spatial_to_global,
    temporal_to_global,
)
from .selective_scan import backend, selective_scan

__all__ = [
    "BiMamba",
    "Mamba",
    "MambaState",
    "SelectiveSSM",
    "TokenGrid",
    "backend",
    "selective_scan",
    "grid_to_global",
    "global_to_grid",
    "global_to_spatial",
    "spatial_to_global",
    "global_to_temporal",
    "temporal_to_global",
]
