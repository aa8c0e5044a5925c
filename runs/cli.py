"""Flags declared once: a dataclass field carries its flags and help, and the parser is generated.

    @dataclass
    class RunConfig:
        batch_size: int = flag("-bs", "--batch_size", help="records per step")
        seed: int | None = flag("-rs", "--random_seed", default=None, help="...")

    parser = build_parser(RunConfig, prog=..., description=...)
    cfg = from_args(RunConfig, parser.parse_args(argv))

The argparse `dest` is the field name; the type comes from the annotation (`int | None` -> int);
a field without a default is a required flag; `bool` fields are on/off switches (`--x/--no-x` when
the default is True, unless `action` says otherwise). Fields without flags are not on the command
line. Validation stays in the dataclass's `__post_init__`, so the CLI and the Python API share it.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

_MISSING = dataclasses.MISSING


def flag(*names: str, help: str, default: Any = _MISSING, group: str | None = None, **argparse_kwargs) -> Any:
    """A dataclass field that is also a command-line flag (`names` as argparse takes them)."""
    metadata = {"flags": names, "help": help, "group": group, "argparse": argparse_kwargs}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _plain_type(annotation) -> type:
    """`int | None` -> int; `list[int] | None` -> int (with nargs set by the caller)."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = options[0]
    if typing.get_origin(base) in (list, tuple):
        return typing.get_args(base)[0]
    return base


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Add one argument per flagged field of dataclass `cls`, in field order, into its help group."""
    hints = typing.get_type_hints(cls)
    groups: dict[str | None, Any] = {None: parser}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "flags" not in meta:
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        kwargs = dict(dest=f.name, help=meta["help"], **meta["argparse"])
        required = f.default is _MISSING and f.default_factory is _MISSING
        if required:
            kwargs["required"] = True
        else:
            kwargs["default"] = f.default if f.default is not _MISSING else f.default_factory()
        kind = _plain_type(hints[f.name])
        if kind is bool and "action" not in kwargs:
            kwargs["action"] = argparse.BooleanOptionalAction if kwargs.get("default") else "store_true"
        elif kind is not bool and "action" not in kwargs:
            kwargs.setdefault("type", kind)
            kwargs.setdefault("metavar", meta["flags"][-1].lstrip("-").upper())  # the paper's flag name
        groups[meta["group"]].add_argument(*meta["flags"], **kwargs)


def build_parser(cls, **parser_kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(**parser_kwargs)
    add_flags(parser, cls)
    return parser


def from_args(cls, args: argparse.Namespace):
    """The flagged fields of `cls` from parsed `args` (fields without flags keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls) if "flags" in f.metadata}
    return cls(**{name: getattr(args, name) for name in names})
