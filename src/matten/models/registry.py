"""Model names -> model families: how each is built, and what a run's options make of it.

    Matten-<S|B|L|XL>/<patch>, Latte-<S|B|L|XL>/<patch>   clip backbones, :func:`create_model`
    Matten-Causal        the long-video backbone, :func:`~matten.models.causal.create_causal_model`

``build_model(**model.config)`` rebuilds any saved model; ``model_kwargs_for_run`` turns a run
config's ``model`` options into the arguments of a new one. Callers never branch on the name.

Clip sizes: ``create_model("Matten-XL/2", variant=3)``, ``create_model("Latte-S/2")``.

Sizes follow the paper's Table 3 (layers L, hidden size D), with N = 16 and E = 2 everywhere. As in
Latte, the paper's "layers" count spatial and temporal layers separately, so a Matten-XL variant 3
(28 layers) is 14 blocks of [spatial attention, temporal attention, global Mamba]. Variants 1, 2 and
4 are given the depths that bring them to the parameter counts of the paper's Table 2 at XL
(814M / 814M / 846M), scaled by the same ratio at the other sizes. See the README for the counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .backbone import LAYOUTS, VideoBackbone
from .causal import CAUSAL_NAME, create_causal_model
from .denoiser import Denoiser

# size -> (paper layers, hidden size, attention heads)
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

# Blocks per model: variant 3 and Latte have layers / 2; the others match Table 2's parameters.
DEPTHS = {
    "S": {1: 27, 2: 13, 3: 6, 4: 10, "latte": 6},
    "B": {1: 27, 2: 13, 3: 6, 4: 10, "latte": 6},
    "L": {1: 54, 2: 27, 3: 12, 4: 20, "latte": 12},
    "XL": {1: 63, 2: 31, 3: 14, 4: 23, "latte": 14},
}

_NAME = re.compile(r"^(Matten|Latte)-(S|B|L|XL)/(\d+)$")
DEFAULT_NAME = "Matten-S/2"  # what a config without a name builds


def _unknown_model(name) -> ValueError:
    return ValueError(
        f"unknown model {name!r}: expected Matten-<S|B|L|XL>/<patch> or "
        f"Latte-<S|B|L|XL>/<patch>, e.g. Matten-XL/2"
    )


def parse_name(name: str) -> tuple[str, str, int]:
    """A clip model's name -> (family "Matten" or "Latte", size, patch)."""
    match = _NAME.match(name)
    if not match:
        raise _unknown_model(name)
    family, size, patch = match.groups()
    return family, size, int(patch)


def model_names() -> list[str]:
    return [f"{family}-{size}/2" for family in ("Matten", "Latte") for size in SIZES]


def create_model(
    name: str = DEFAULT_NAME,
    variant: int = 3,
    conditioning: str = "adan",
    num_frames: int = 16,
    input_size: int | tuple[int, int] = 32,
    in_channels: int = 4,
    num_classes: int = 0,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    depth: int | None = None,
    hidden_size: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    d_state: int = 16,
    expand: int = 2,
    gradient_checkpointing: bool = False,
) -> VideoBackbone:
    """Build a backbone by name. ``depth``/``hidden_size``/``num_heads`` override the size's values
    (for tiny test models). ``num_frames`` and ``input_size`` (latent H, W) record the training
    shape, used by samplers; the network itself accepts any frame count and any size divisible by
    the patch. ``model.config`` holds these arguments, enough to rebuild the model."""
    config = dict(locals())
    family, size, patch = parse_name(name)
    layout_key = "latte" if family == "Latte" else variant
    if layout_key not in LAYOUTS:
        raise ValueError(f"unknown variant {variant!r}: Matten has variants 1, 2, 3 and 4")
    layers, default_hidden, default_heads = SIZES[size]
    model = VideoBackbone(
        LAYOUTS[layout_key],
        depth or DEPTHS[size][layout_key],
        hidden_size or default_hidden,
        num_heads or default_heads,
        patch_size=patch,
        in_channels=in_channels,
        learn_sigma=learn_sigma,
        num_classes=num_classes,
        class_dropout_prob=class_dropout_prob,
        conditioning=conditioning,
        mlp_ratio=mlp_ratio,
        d_state=d_state,
        expand=expand,
        gradient_checkpointing=gradient_checkpointing,
    )
    if isinstance(config["input_size"], tuple):
        config["input_size"] = list(config["input_size"])
    if family == "Latte":
        config["variant"] = None
    model.config = config
    return model


# --------------------------------------------------------------------------------------------
# From a run's options
# --------------------------------------------------------------------------------------------


def _size_overrides(options: dict) -> dict:
    return {
        key: options[key]
        for key in ("depth", "hidden_size", "num_heads")
        if options.get(key) is not None
    }


def _clip_kwargs(
    options: dict, in_channels: int, latent_hw, num_classes: int, num_frames: int
) -> dict:
    height, width = latent_hw
    return dict(
        name=options["name"],
        variant=options["variant"],
        conditioning=options["conditioning"],
        num_frames=num_frames,
        input_size=height if height == width else tuple(latent_hw),
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=options["learn_sigma"],
        class_dropout_prob=options["class_dropout_prob"],
        gradient_checkpointing=options["gradient_checkpointing"],
        **_size_overrides(options),
    )


# Causal options added later: read when the options have them (a run config always does), else
# the model's defaults, which are how models ran before the options existed.
_LATER_CAUSAL_OPTIONS = ("window_kind", "malt_slots", "malt_segment", "action_dropout_prob")


def _causal_kwargs(
    options: dict, in_channels: int, latent_hw, num_classes: int, num_frames: int
) -> dict:
    causal = options["causal"]
    # the training clip length is only the router's reference length: any video length runs
    return dict(
        name=options["name"],
        input_size=list(latent_hw),
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=options["learn_sigma"],
        class_dropout_prob=options["class_dropout_prob"],
        num_actions=causal["num_actions"],
        window=causal["window"],
        sink=causal["sink"],
        memory=causal["memory"],
        ssm_block_size=causal["ssm_block_size"],
        context_length=num_frames,
        **{key: causal[key] for key in _LATER_CAUSAL_OPTIONS if key in causal},
        **_size_overrides(options),
    )


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """A kind of backbone: ``build(**config)`` makes one from its ``model.config``;
    ``kwargs_for_run(options, in_channels, latent_hw, num_classes, num_frames)`` gives that
    config's arguments from a run's model options and data shape."""

    matches: Callable[[str], bool]
    build: Callable[..., Denoiser]
    kwargs_for_run: Callable[..., dict]


FAMILIES = {
    "clip": ModelFamily(lambda name: _NAME.match(name) is not None, create_model, _clip_kwargs),
    "causal": ModelFamily(lambda name: name == CAUSAL_NAME, create_causal_model, _causal_kwargs),
}


def family_of(name: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.matches(name):
            return family
    raise _unknown_model(name)


def build_model(**config) -> Denoiser:
    """A model from its ``model.config`` (as stored in every checkpoint), whatever its family."""
    return family_of(config.get("name", DEFAULT_NAME)).build(**config)


def model_kwargs_for_run(
    options: dict, *, in_channels: int, latent_hw, num_classes: int, num_frames: int
) -> dict:
    """The arguments of :func:`build_model` for a new run: ``options`` is the run config's
    ``model`` section as a dict (name, variant, conditioning, learn_sigma, class_dropout_prob,
    depth / hidden_size / num_heads (None: the size's), gradient_checkpointing, and ``causal``:
    window, sink, memory, num_actions, ssm_block_size, window_kind, malt_slots, malt_segment,
    action_dropout_prob;
    each family reads its own); the rest is the data's: latent channels, latent (H, W), class count
    and training
    clip length."""
    return family_of(options["name"]).kwargs_for_run(
        options, in_channels, latent_hw, num_classes, num_frames
    )
