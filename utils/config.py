"""Dataclass configs read from YAML with type checks (litgpt style).

`load_config(cls, path)` builds a (possibly nested) dataclass from a YAML file, read with
`yaml.safe_load`. Unknown keys and wrong types are one clear error naming the file and the key; a
`UserError` raised by a dataclass's `__post_init__` (its range checks) gets the file (and the
section, e.g. `path.retrieval_editor`) put in front.
`config_to_dict` is the inverse, used to write the `config.yaml` of a run.
"""
from __future__ import annotations

import dataclasses
import os
import typing

import yaml

from utils.errors import UserError


def _coerce(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(annotation) or (object,)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        annotation = next(a for a in options if a is not type(None))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, str, bool) and not (isinstance(value, annotation) and
                                               not (annotation is int and isinstance(value, bool))):
        raise UserError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, where: str = "config"):
    """Build dataclass `cls` from `data`; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except UserError as exc:  # a range check in the dataclass's __post_init__: say which file
        raise UserError(f"{where}: {exc}") from None


def load_config(cls, path: str):
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return from_dict(cls, data, where=path)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)
