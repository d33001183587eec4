"""Backbones: embeddings, attention and Mamba layers, Matten's variants and the Latte baseline."""

from .backbone import LAYOUTS, VideoBackbone
from .causal import CausalVideoBackbone, create_causal_model
from .layers import AttentionLayer, Condition, MambaLayer
from .registry import DEPTHS, SIZES, create_model, model_names, parse_name

__all__ = ["LAYOUTS", "VideoBackbone", "AttentionLayer", "CausalVideoBackbone", "Condition",
           "MambaLayer", "DEPTHS", "SIZES", "CAUSAL_NAME", "build_model", "create_causal_model",
           "create_model", "model_names", "parse_name"]

CAUSAL_NAME = "Matten-Causal"


def build_model(**config):
    """A model from its ``model.config``: ``name="Matten-Causal"`` builds the causal long-video
    backbone (:func:`create_causal_model`), any other name a clip model (:func:`create_model`)."""
    if config.get("name") == CAUSAL_NAME:
        kwargs = {k: v for k, v in config.items() if k != "name"}
        model = create_causal_model(**kwargs)
        model.config = {"name": CAUSAL_NAME, **model.config}
        return model
    return create_model(**config)
