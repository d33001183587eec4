"""Run configuration: the schema (six typed sections), reading YAML with ``key=value``
overrides, and the checks made once when a config is loaded."""

from .loader import (
    apply_overrides,
    config_differences,
    config_from_dict,
    config_to_dict,
    load_config,
    packaged_configs,
    parse_override,
    resolve_mixed_precision,
)
from .schema import (
    SECTIONS,
    AutoencoderConfig,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
)
from .validation import ConfigError, validate

__all__ = [
    "ModelConfig",
    "DataConfig",
    "AutoencoderConfig",
    "DiffusionConfig",
    "TrainConfig",
    "SampleConfig",
    "RunConfig",
    "ConfigError",
    "SECTIONS",
    "load_config",
    "packaged_configs",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_differences",
    "parse_override",
    "resolve_mixed_precision",
    "validate",
]
