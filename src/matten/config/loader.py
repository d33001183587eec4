"""Reading run configs: packaged configs by name or YAML files, typed ``key=value`` overrides.

``load_config("demo")`` reads the packaged ``matten/configs/demo.yaml``; any other name is a path
to a YAML file. Overrides use dotted keys: ``train.batch_size=4``; the value is parsed as YAML
(``null``, ``true``, ``1e-4``, ``[1, 2]``) and checked against the field's type. Unknown keys are
an error that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Union

import yaml

from ..data import dataset_key
from .schema import SECTIONS, CausalConfig, RunConfig
from .validation import ConfigError

__all__ = [
    "load_config",
    "packaged_configs",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_differences",
    "parse_override",
    "resolve_mixed_precision",
]

logger = logging.getLogger(__name__)


class _Loader(yaml.SafeLoader):
    """YAML as people mean it in a config: only true/false are booleans (so `no`, `on`, `off`
    stay strings, e.g. ``mixed_precision: no``) and ``1e-4`` is a number."""


_Loader.yaml_implicit_resolvers = {
    key: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


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
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"config key '{key}': {value!r} matches none of {hint}"
        )
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
            raise ConfigError(
                f"config key '{key}' must be a list of {len(args)} values, got {value!r}"
            )
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    return value


def _field_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known) -> ConfigError:
    return ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(known))})")


def config_from_dict(data: dict | None, base: RunConfig | None = None) -> RunConfig:
    """A :class:`RunConfig` from nested dicts (missing keys keep ``base``'s or the defaults)."""
    return config_from_dict_into(
        copy.deepcopy(base) if base is not None else RunConfig(), data or {}
    )


# Keys that moved into a nested group, old spelling -> new: old run folders, checkpoints and
# habits keep working, and a note (once per key) gives the new spelling.
MOVED_KEYS = {f"model.{f.name}": f"model.causal.{f.name}" for f in dataclasses.fields(CausalConfig)}
_noted_moves: set[str] = set()


def _new_spelling(key: str) -> str:
    """Where a dotted key lives now (itself unless it moved), with a note once per moved key."""
    new = MOVED_KEYS.get(key, key)
    if new != key and key not in _noted_moves:
        _noted_moves.add(key)
        logger.warning("config key '%s' is now '%s'; read as that", key, new)
    return new


def _with_moved_keys(prefix: str, values: dict) -> dict:
    """``values`` of the group ``prefix`` with old spellings put where the keys live now (a key
    given in both spellings keeps the new one)."""
    moved = {
        key: MOVED_KEYS[f"{prefix}.{key}"] for key in values if f"{prefix}.{key}" in MOVED_KEYS
    }
    if not moved:
        return values
    kept = {key: value for key, value in values.items() if key not in moved}
    for key in moved:
        new = _new_spelling(f"{prefix}.{key}")
        group, leaf = new[len(prefix) + 1 :].split(".")
        target = kept.get(group)
        target = dict(target) if isinstance(target, dict) else {}
        target.setdefault(leaf, values[key])
        kept[group] = target
    return kept


def _fill(obj, values, prefix: str):
    """A copy of the dataclass ``obj`` with ``values`` set, each checked against its field's type;
    a nested dataclass field takes a mapping of its own fields."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {values!r}")
    hints = _field_hints(type(obj))
    obj = dataclasses.replace(obj)
    for key, value in _with_moved_keys(prefix, values).items():
        name = f"{prefix}.{key}"
        if key not in hints:
            raise _unknown_key(name, [f"{prefix}.{k}" for k in hints])
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            setattr(obj, key, current if value is None else _fill(current, value, name))
        else:
            setattr(obj, key, _coerce(value, hints[key], name))
    return obj


def config_from_dict_into(cfg: RunConfig, data: dict) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    classes = _section_classes()
    # copies: a derived config never shares a section (or a list or dict in one) with its base
    sections = {name: copy.deepcopy(getattr(cfg, name)) for name in classes}
    for name, values in data.items():
        if name not in classes:
            raise _unknown_key(str(name), classes)
        if values is not None:
            sections[name] = _fill(sections[name], values, name)
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


def _flat_fields(obj, prefix: str) -> dict[str, Any]:
    """``{"model.causal.window": 8, ...}``: every leaf field of a dataclass, nested ones opened."""
    flat = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(_flat_fields(value, f"{prefix}.{f.name}"))
        else:
            flat[f"{prefix}.{f.name}"] = value
    return flat


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.batch_size=4"`` -> ``("train.batch_size", 4)`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(
            f"override '{item}' must look like section.key=value, e.g. train.batch_size=4"
        )
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
        parts = _new_spelling(key).split(".")  # in order: a later override wins, old or new
        group = getattr(getattr(cfg, parts[0], None), parts[1], None) if len(parts) == 3 else None
        if dataclasses.is_dataclass(group):  # a field of a nested group: model.causal.window=4
            section, name, leaf = parts
            nested.setdefault(section, {}).setdefault(name, {})[leaf] = value
            continue
        if isinstance(group, dict):
            # one entry of a dict field: data.options.step=2
            section, name, entry = parts
            entries.setdefault((section, name), {})[entry] = value
            continue
        if len(parts) != 2:
            raise ConfigError(
                f"override key '{key}' must be section.key, e.g. train.batch_size "
                f"(or section.group.key, e.g. model.causal.window, or "
                f"section.key.entry for a dict such as data.options)"
            )
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
    logger.warning(
        "data.name changed from '%s' to '%s': dropping the options of '%s' (%s); "
        "set data.options.KEY=VALUE for the new dataset",
        cfg.data.name,
        data_overrides["name"],
        cfg.data.name,
        ", ".join(f"{k}={v!r}" for k, v in cfg.data.options.items()),
    )
    data_overrides["options"] = {}


def config_differences(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old value, new value)}`` for every value that differs (nested groups
    by their full key, e.g. ``model.causal.window``)."""
    a = {k: v for name in SECTIONS for k, v in _flat_fields(getattr(old, name), name).items()}
    b = {k: v for name in SECTIONS for k, v in _flat_fields(getattr(new, name), name).items()}
    return {key: (a.get(key), value) for key, value in b.items() if a.get(key) != value}


def packaged_configs() -> list[str]:
    """Names of the configs shipped in ``matten/configs``."""
    folder = resources.files("matten") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> tuple[dict, str]:
    path = Path(name_or_path).expanduser()
    # A bare name is a packaged config even when a folder of that name (say a run called
    # "demo") sits in the working directory; a file, a .yaml name or a path is a file.
    if (
        path.is_file()
        or path.suffix in (".yaml", ".yml")
        or os.sep in str(name_or_path)
        or "/" in str(name_or_path)
    ):
        if not path.is_file():
            raise FileNotFoundError(
                f"config file '{path}' not found (packaged configs: "
                f"{', '.join(packaged_configs())})"
            )
        text, where = path.read_text(), str(path)
    else:
        resource = resources.files("matten") / "configs" / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise FileNotFoundError(
                f"no packaged config '{name_or_path}' (choose one of "
                f"{', '.join(packaged_configs())}, or give a YAML path)"
            )
        text, where = resource.read_text(), f"matten/configs/{name_or_path}.yaml"
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config '{where}': {exc}") from None
    return data or {}, where


def _read_with_bases(name_or_path: str, seen: tuple[str, ...] = ()) -> tuple[dict, str]:
    """A config's sections with those of the config it names as ``base`` (a packaged name or a
    path) underneath: mappings merge key by key, anything else the derived config gives wins."""
    data, where = _read_yaml(name_or_path)
    if not isinstance(data, dict) or "base" not in data:
        return data, where
    data = dict(data)
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base must name a config, got {base!r}")
    if where in seen:
        raise ConfigError(f"{where}: configs name each other as base ({' -> '.join(seen)})")
    below, _ = _read_with_bases(base, (*seen, where))
    return _merged(below, data), where


def _merged(below, above):
    if not (isinstance(below, dict) and isinstance(above, dict)):
        return copy.deepcopy(above)
    out = copy.deepcopy(below)
    for key, value in above.items():
        out[key] = _merged(out.get(key), value) if key in out else copy.deepcopy(value)
    return out


def load_config(
    name_or_path: str | None = None, overrides: list[str] | dict | None = None
) -> RunConfig:
    """Read a packaged config by name (``"demo"``) or a YAML file, then apply ``overrides``."""
    cfg = RunConfig()
    if name_or_path is not None:
        data, where = _read_with_bases(str(name_or_path))
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
