"""Typed recipe configs: a dataclass per recipe, YAML plus `a.b=c` overrides, strict validation.

Each field is declared with `option(default, "what it means")`, so its documentation lives in one
place and `describe(cls)` can print it. Unknown keys (with a did-you-mean), wrong types and values
outside a Literal's choices raise `ConfigError` naming the field and the fix; a recipe's own
cross-field checks go in a `validate()` method that raises `ConfigError` the same way.
Command lines catch `ConfigError`, print its one line and exit with code 2 (`exit_on_config_error`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the field and the fix."""


def option(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with its one-line documentation; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kwargs)
    return dataclasses.field(default=default, metadata={"doc": doc}, **kwargs)


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per field, `name (type, default): doc`, nested dataclasses flattened with dots."""
    lines = []
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            lines += describe(hint, prefix + field.name + ".")
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        lines.append(f"{prefix}{field.name} ({_type_name(hint)}, default {default!r}): {field.metadata.get('doc', '')}")
    return lines


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + "|".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(hint))}]"
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check `value` against the type hint; allow only lossless conversions (int -> float)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value is False and "no" in get_args(hint):  # YAML 1.1 reads a bare `no` as false (mixed_precision: no)
            value = "no"
        if value not in get_args(hint):
            raise ConfigError(f"config field '{name}': {value!r} is not allowed; use one of {list(get_args(hint))}")
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(f"config field '{name}': expected {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"config field '{name}': expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}': expected a list, got {value!r} ({type(value).__name__}); write [a, b]")
        (item_hint, *_) = get_args(hint) or (Any,)
        return [_coerce(v, item_hint, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}': expected a mapping, got {value!r} ({type(value).__name__}); write {{key: value}}")
        key_hint, value_hint = get_args(hint) or (Any, Any)
        return {_coerce(k, key_hint, f"{name} key"): _coerce(v, value_hint, f"{name}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{name}': expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field '{name}': expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{name}': expected a number, got {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ConfigError(f"config field '{name}': {value!r} is not a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{name}': expected a string, got {value!r} ({type(value).__name__}); quote it")
        return value
    raise TypeError(f"config field '{name}': unsupported type {hint!r} in the dataclass")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build the dataclass `cls` from nested dicts, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}': expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known fields: {', '.join(names)}"
            raise ConfigError(f"unknown config field '{prefix}{key}'{hint}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = from_dict(hints[key], value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
    config = cls(**kwargs)
    if hasattr(config, "validate"):
        config.validate()
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=3", "c=[1, 2]"]` -> `{"a": {"b": 3}, "c": [1, 2]}`; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value; write for example train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({error.problem})") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is set to a value and used as a section")
        node[leaf] = value
    return tree


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read YAML at `path` (optional), apply `key=value` overrides, validate into `cls`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file; pass a YAML file such as configs/flow/flow_grpo.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"--config {path}: not valid YAML ({error})".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: the top level must be a mapping of field: value")
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def exit_on_config_error(error: ConfigError) -> typing.NoReturn:
    """Print the one-line message (no traceback) and exit with code 2, as command lines should. Under a
    multi-process launcher every process meets the same error; only the first (RANK 0) prints it, so the user
    reads one line."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"config error: {error}", file=sys.stderr)
    raise SystemExit(2)
