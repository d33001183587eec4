"""Backbones: embeddings, attention and Mamba layers, Matten's variants and the Latte baseline."""

from .backbone import LAYOUTS, VideoBackbone
from .layers import AttentionLayer, Condition, MambaLayer
from .registry import DEPTHS, SIZES, create_model, model_names, parse_name

__all__ = ["LAYOUTS", "VideoBackbone", "AttentionLayer", "Condition", "MambaLayer", "DEPTHS",
           "SIZES", "create_model", "model_names", "parse_name"]
