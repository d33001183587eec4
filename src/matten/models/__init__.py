"""Backbones: embeddings, attention and Mamba layers, Matten's variants, the Latte baseline and
the causal long-video backbone, with one registry from model name to builder."""

from .backbone import LAYOUTS, VideoBackbone
from .causal import (
    CAUSAL_NAME,
    MEMORY_KINDS,
    WINDOW_KINDS,
    CausalState,
    CausalVideoBackbone,
    create_causal_model,
)
from .denoiser import Denoiser
from .layers import CONDITIONING_MODES, AttentionLayer, Condition, MambaLayer
from .registry import (
    DEPTHS,
    FAMILIES,
    SIZES,
    ModelFamily,
    build_model,
    create_model,
    family_of,
    model_kwargs_for_run,
    model_names,
    parse_name,
)

__all__ = [
    "LAYOUTS",
    "VideoBackbone",
    "CAUSAL_NAME",
    "MEMORY_KINDS",
    "WINDOW_KINDS",
    "CausalState",
    "CausalVideoBackbone",
    "create_causal_model",
    "Denoiser",
    "CONDITIONING_MODES",
    "AttentionLayer",
    "Condition",
    "MambaLayer",
    "DEPTHS",
    "FAMILIES",
    "SIZES",
    "ModelFamily",
    "build_model",
    "create_model",
    "family_of",
    "model_kwargs_for_run",
    "model_names",
    "parse_name",
]
