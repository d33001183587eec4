"""Run configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

A run config has six sections: ``model``, ``data``, ``autoencoder``, ``diffusion``, ``train`` and
``sample``. ``load_config("demo")`` reads the packaged ``matten/configs/demo.yaml``; any other
name is a path to a YAML file. Overrides use dotted keys: ``train.batch_size=4``; the value is
parsed as YAML (``null``, ``true``, ``1e-4``, ``[1, 2]``) and checked against the field's type.
Unknown keys are an error that names the key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from .data.registry import dataset_key

__all__ = ["ModelConfig", "DataConfig", "AutoencoderConfig", "DiffusionConfig", "TrainConfig",
           "SampleConfig", "RunConfig", "ConfigError", "load_config", "packaged_configs",
           "apply_overrides", "config_from_dict", "config_to_dict", "resolve_mixed_precision",
           "config_differences"]

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad config file, key or value."""


@dataclass
class ModelConfig:
    name: str = "Matten-S/2"  # Matten-S/B/L/XL/2, Latte-S/B/L/XL/2 (the attention baseline) or
    # Matten-Causal (the long-video backbone: window / sink / memory / num_actions below)
    variant: int = 3  # Matten variants 1-4 (paper Sec. 3.2); ignored by Latte
    conditioning: str = "adan"  # "adan" (M-AdaN / adaLN-Zero) or "tokens" (conditional tokens)
    num_classes: int | None = None  # None: the dataset's class count (0 = unconditional)
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    learn_sigma: bool = True
    depth: int | None = None  # overrides of the size's depth / hidden size / heads
    hidden_size: int | None = None
    num_heads: int | None = None
    gradient_checkpointing: bool = False
    window: int = 8  # Matten-Causal: frames of the sliding attention window
    sink: int = 1  # Matten-Causal: first frames always attended to
    memory: str = "both"  # Matten-Causal global memory: "ssm", "delta", "both" or "none"
    num_actions: int = 0  # Matten-Causal: discrete per-frame actions (0: none)
    ssm_block_size: int | list = 2  # Matten-Causal SSM blocks in tokens: n, [b_h, b_w] or per layer


@dataclass
class DataConfig:
    name: str = "synthetic"  # ucf101, sky_timelapse, faceforensics, taichi_hd, folder, synthetic
    root: str | None = None  # dataset folder (not used by "synthetic")
    resolution: int = 32
    num_frames: int = 16
    frame_stride: int = 3
    split: str | None = None  # e.g. "train" for the benchmark layouts
    num_videos: int = 512  # synthetic set only
    num_classes: int = 4  # synthetic set only: number of motion classes (0 = unlabelled)
    hflip: float = 0.5  # horizontal flip probability (video datasets)
    num_workers: int = 0  # DataLoader workers
    options: dict = field(default_factory=dict)  # extra keyword arguments of the dataset


@dataclass
class AutoencoderConfig:
    kind: str = "pixel"  # "pixel" (identity) or "sd-vae" (Stable Diffusion v1-4 VAE)
    path: str | None = None  # sd-vae: local folder or .safetensors file (never downloaded)
    frame_batch_size: int = 16  # frames per VAE call


@dataclass
class DiffusionConfig:
    steps: int = 1000  # diffusion steps of the training chain
    timestep_respacing: str = ""  # training respacing ("" keeps all steps)
    prediction: str = "eps"  # what the model predicts: "eps" (the paper) or "velocity"
    forcing: bool = False  # diffusion forcing: an independent noise level per frame
    history_prob: float = 0.0  # forcing: chance a clip's first frames are clean history (no loss)


@dataclass
class TrainConfig:
    output: str | None = None  # run folder (the --output option)
    batch_size: int = 8  # global batch, split over the processes
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0  # max gradient norm; null disables clipping
    ema_decay: float = 0.9999
    ema_early_decay: float | None = None  # decay used for the first ema_early_steps steps
    ema_early_steps: int = 0
    mixed_precision: str = "auto"  # "no", "bf16", "fp16"; "auto": bf16 on CUDA if supported
    seed: int = 0
    log_every: int = 10  # steps between loss records
    checkpoint_every: int = 1000
    keep_last: int = 3  # checkpoints kept (older ones are deleted); 0 keeps all
    sample_every: int = 0  # steps between sample videos (0: only at the end)
    cpu: bool = False  # train on the CPU even if a GPU is present
    deterministic: bool = False  # deterministic GPU kernels (exact resume on CUDA; slower)


@dataclass
class SampleConfig:
    num_samples: int = 8
    sampler: str = "ddim"  # "ddpm" or "ddim"
    steps: int | None = None  # respaced steps; None: 250 (ddpm) / 50 (ddim)
    eta: float = 0.0
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = none)
    seed: int = 0
    fps: int = 8


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> RunConfig:
        """Check values that a type alone does not; returns self."""
        problems = []
        if self.model.conditioning not in ("adan", "tokens"):
            problems.append(f"model.conditioning must be 'adan' or 'tokens', got "
                            f"{self.model.conditioning!r}")
        if self.model.variant not in (1, 2, 3, 4):
            problems.append(f"model.variant must be 1, 2, 3 or 4, got {self.model.variant}")
        if self.model.num_classes is not None and self.model.num_classes < 0:
            problems.append("model.num_classes must be >= 0 (or null for the dataset's count)")
        if not 0.0 <= self.model.class_dropout_prob < 1.0:
            problems.append("model.class_dropout_prob must be in [0, 1)")
        for key in ("resolution", "num_frames", "frame_stride", "num_videos"):
            if getattr(self.data, key) < 1:
                problems.append(f"data.{key} must be >= 1")
        if not 0.0 <= self.data.hflip <= 1.0:
            problems.append("data.hflip must be in [0, 1]")
        if self.data.num_workers < 0:
            problems.append("data.num_workers must be >= 0")
        if self.autoencoder.frame_batch_size < 1:
            problems.append("autoencoder.frame_batch_size must be >= 1")
        t = self.train
        for key in ("batch_size", "max_steps", "log_every", "checkpoint_every"):
            if getattr(t, key) < 1:
                problems.append(f"train.{key} must be >= 1")
        if t.keep_last < 0 or t.sample_every < 0 or t.ema_early_steps < 0:
            problems.append("train.keep_last, train.sample_every and train.ema_early_steps must "
                            "be >= 0")
        if t.lr <= 0:
            problems.append("train.lr must be > 0")
        for key in ("ema_decay", "ema_early_decay"):
            value = getattr(t, key)
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"train.{key} must be in [0, 1]")
        if t.grad_clip is not None and t.grad_clip <= 0:
            problems.append("train.grad_clip must be > 0 (or null to disable clipping)")
        if t.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            problems.append(f"train.mixed_precision must be auto, no, bf16 or fp16, got "
                            f"{t.mixed_precision!r}")
        if self.model.memory not in ("ssm", "delta", "both", "none"):
            problems.append(f"model.memory must be ssm, delta, both or none, got "
                            f"{self.model.memory!r}")
        if self.model.window < 1 or self.model.sink < 0 or self.model.num_actions < 0:
            problems.append("model.window must be >= 1, model.sink and model.num_actions >= 0")
        block = self.model.ssm_block_size
        if not (isinstance(block, int) and block >= 1 or isinstance(block, list) and block):
            problems.append(f"model.ssm_block_size must be a positive int, [b_h, b_w] or a list "
                            f"of per-layer sizes, got {block!r}")
        if self.diffusion.prediction not in ("eps", "velocity"):
            problems.append(f"diffusion.prediction must be 'eps' or 'velocity', got "
                            f"{self.diffusion.prediction!r}")
        if not 0.0 <= self.diffusion.history_prob <= 1.0:
            problems.append("diffusion.history_prob must be in [0, 1]")
        if self.diffusion.history_prob > 0 and not self.diffusion.forcing:
            problems.append("diffusion.history_prob needs diffusion.forcing: true")
        s = self.sample
        if s.sampler not in ("ddpm", "ddim"):
            problems.append(f"sample.sampler must be 'ddpm' or 'ddim', got {s.sampler!r}")
        if s.num_samples < 1 or (s.steps is not None and s.steps < 1) or s.fps < 1:
            problems.append("sample.num_samples, sample.steps and sample.fps must be >= 1")
        if not 0.0 <= s.eta <= 1.0:
            problems.append("sample.eta must be in [0, 1]")
        if s.cfg_scale < 0:
            problems.append("sample.cfg_scale must be >= 0")
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        return self


SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


class _Loader(yaml.SafeLoader):
    """YAML as people mean it in a config: only true/false are booleans (so `no`, `on`, `off`
    stay strings, e.g. ``mixed_precision: no``) and ``1e-4`` is a number."""


_Loader.yaml_implicit_resolvers = {
    key: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: hints[name] for name in SECTIONS}


# ----------------------------------------------------------------------------------------------
# typed values

def _coerce(value: Any, hint, key: str) -> Any:
    """``value`` checked (and, where lossless, converted) against the annotation ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"config key '{key}' may not be null")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key '{key}': {value!r} matches none of {hint}")
    if value is None:
        if hint is dict or origin is dict:  # `data.options=null`: no options
            return {}
        raise ConfigError(f"config key '{key}' may not be null")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, "
                              f"got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return value


def _field_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known) -> ConfigError:
    return ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(known))})")


def config_from_dict(data: dict | None, base: RunConfig | None = None) -> RunConfig:
    """A :class:`RunConfig` from nested dicts (missing keys keep ``base``'s or the defaults)."""
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    cfg = config_from_dict_into(cfg, data or {})
    return cfg


def config_from_dict_into(cfg: RunConfig, data: dict) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    classes = _section_classes()
    sections = {name: dataclasses.replace(getattr(cfg, name)) for name in classes}
    for name, values in data.items():
        if name not in classes:
            raise _unknown_key(str(name), classes)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {values!r}")
        hints = _field_hints(classes[name])
        for key, value in values.items():
            if key not in hints:
                raise _unknown_key(f"{name}.{key}", [f"{name}.{k}" for k in hints])
            setattr(sections[name], key, _coerce(value, hints[key], f"{name}.{key}"))
    return RunConfig(**sections)


def config_to_dict(cfg: RunConfig) -> dict:
    """Nested plain dicts (tuples become lists), ready for YAML/JSON."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {name: plain(dataclasses.asdict(getattr(cfg, name))) for name in SECTIONS}


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.batch_size=4"`` -> ``("train.batch_size", 4)`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value, "
                          "e.g. train.batch_size=4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.count(".") not in (1, 2) or not all(key.split(".")):
        raise ConfigError(f"override key '{key}' must be section.key, e.g. train.batch_size")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: RunConfig, overrides: list[str] | dict | None) -> RunConfig:
    """Apply ``["section.key=value", ...]`` or ``{"section.key": value}`` to a config."""
    if not overrides:
        return cfg
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    nested: dict[str, dict] = {}
    entries: dict[tuple[str, str], dict] = {}  # one-entry overrides of dict fields
    for key, value in items:
        parts = key.split(".")
        if len(parts) == 3 and isinstance(getattr(getattr(cfg, parts[0], None), parts[1], None),
                                          dict):
            # one entry of a dict field: data.options.step=2
            section, name, entry = parts
            entries.setdefault((section, name), {})[entry] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"override key '{key}' must be section.key, e.g. train.batch_size "
                              f"(or section.key.entry for a dict such as data.options)")
        section, name = parts
        nested.setdefault(section, {})[name] = value
        entries.pop((section, name), None)  # a whole dict given later replaces earlier entries
    _drop_other_datasets_options(cfg, nested.get("data"))
    for (section, name), values in entries.items():
        fields = nested.setdefault(section, {})
        base = (fields[name] or {}) if name in fields else getattr(getattr(cfg, section), name)
        fields[name] = {**base, **values}
    return config_from_dict_into(cfg, nested)


def _drop_other_datasets_options(cfg: RunConfig, data_overrides: dict | None) -> None:
    """``data.options`` are keyword arguments of one dataset class: when an override switches
    ``data.name`` (say the demo's synthetic set to ``folder``), the old dataset's options would
    be passed to the new one and fail, so they are dropped unless options are given too."""
    if not data_overrides or "name" not in data_overrides or "options" in data_overrides:
        return
    if dataset_key(data_overrides["name"]) == dataset_key(cfg.data.name) or not cfg.data.options:
        return
    logger.warning("data.name changed from '%s' to '%s': dropping the options of '%s' (%s); "
                   "set data.options.KEY=VALUE for the new dataset", cfg.data.name,
                   data_overrides["name"], cfg.data.name,
                   ", ".join(f"{k}={v!r}" for k, v in cfg.data.options.items()))
    data_overrides["options"] = {}


def config_differences(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old value, new value)}`` for every value that differs."""
    a, b = config_to_dict(old), config_to_dict(new)
    return {f"{section}.{key}": (a[section].get(key), value)
            for section in b for key, value in b[section].items()
            if a[section].get(key) != value}


def packaged_configs() -> list[str]:
    """Names of the configs shipped in ``matten/configs``."""
    folder = resources.files("matten") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path).expanduser()
    # A bare name is a packaged config even when a folder of that name (say a run called
    # "demo") sits in the working directory; a file, a .yaml name or a path is a file.
    if path.is_file() or path.suffix in (".yaml", ".yml") or os.sep in str(name_or_path) \
            or "/" in str(name_or_path):
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' not found (packaged configs: "
                                    f"{', '.join(packaged_configs())})")
        text, where = path.read_text(), str(path)
    else:
        resource = resources.files("matten") / "configs" / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise FileNotFoundError(f"no packaged config '{name_or_path}' (choose one of "
                                    f"{', '.join(packaged_configs())}, or give a YAML path)")
        text, where = resource.read_text(), f"matten/configs/{name_or_path}.yaml"
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config '{where}': {exc}") from None
    return data or {}, where


def load_config(name_or_path: str | None = None, overrides: list[str] | dict | None = None
                ) -> RunConfig:
    """Read a packaged config by name (``"demo"``) or a YAML file, then apply ``overrides``."""
    cfg = RunConfig()
    if name_or_path is not None:
        data, where = _read_yaml(str(name_or_path))
        try:
            cfg = config_from_dict_into(cfg, data)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return apply_overrides(cfg, overrides).validate()


def resolve_mixed_precision(value: str, device_type: str) -> str:
    """``"auto"`` -> ``"bf16"`` on a CUDA device that supports it, else ``"no"``."""
    if value != "auto":
        return value
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16"
    return "no"
