"""The embedded default: a generated world of small scenes with edits in the MMEdit schema.

`world.py` draws the scenes and writes the data set; `ensure_toy_data` is what `-dna TOY` /
`-dn TOY` call. This package sits just above `utils/`: it imports nothing from `editors/` or
`runs/` (the tiny backbones' tokenizer reads its vocabulary; their pretraining is `runs/pretrain.py`).
"""
from __future__ import annotations

import os

from utils.errors import UserError
from .world import corpus_lines, ensure_toyworld, read_manifest, toyworld_args


def ensure_toy_data(data_dir: str | os.PathLike = "data") -> str:
    """The toy world under `data_dir/toyworld`, for `-dna TOY` / `-dn TOY` (see `keep_toyworld`)."""
    return keep_toyworld(os.path.join(data_dir, "toyworld"))


def keep_toyworld(out_dir: str | os.PathLike) -> str:
    """The toy world in `out_dir`: one already there is kept whatever its size and version (tests
    and users make small ones, `--version 4` makes bigger ones); an outdated generator output is
    regenerated with the same arguments; a missing one gets the default size."""
    args = (read_manifest(out_dir) or {}).get("args") or {}
    try:
        toyworld_args(**args)
    except (TypeError, UserError):
        args = {}
    return str(ensure_toyworld(out_dir, **args))


__all__ = ["corpus_lines", "ensure_toy_data", "ensure_toyworld", "keep_toyworld", "read_manifest", "toyworld_args"]
