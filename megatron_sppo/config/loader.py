"""YAML config files with ``key=value`` overrides, checked against dataclass schemas.

Every section of the config is a dataclass (config/schema.py); this module turns a YAML
mapping plus command-line overrides into those dataclasses and refuses, with one line naming
the key, anything the schema does not know or a value of the wrong type, before any model
is built. The resolved config is written back as YAML so every run records what it ran.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_sppo.errors import UserError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """``value`` as type ``tp`` (dataclass, Optional, list/tuple, scalar) or a UserError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[-1])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping of {tp.__name__} fields, "
                            f"got {value!r}")
        return build_section(tp, value, key)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key {key}: expected a string, got {value!r}")
    if tp is dict:
        if isinstance(value, dict):
            return value
        raise UserError(f"config key {key}: expected a mapping, got {value!r}")
    raise TypeError(f"schema type {_type_name(tp)} of {key} is not supported")


def build_section(cls, values: dict, prefix: str = ""):
    """Dataclass ``cls`` from a mapping; unknown keys and bad types name the full key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise UserError(f"unknown config key {full}: valid keys here are "
                            f"{', '.join(sorted(names))}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k])
              for k, v in values.items()}
    try:
        return cls(**kwargs)
    except UserError:
        raise
    except (ValueError, TypeError) as e:  # a section's own __post_init__ check
        raise UserError(f"config section {prefix or cls.__name__}: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], YAML-parsed value)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not key=value (e.g. trainer.total_steps=10)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key part")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: pass --config PATH to a YAML file")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(tree, dict):
        raise UserError(f"config file {path} must hold a mapping of sections at the top")
    return tree


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def write_yaml_atomic(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    os.replace(tmp, path)
