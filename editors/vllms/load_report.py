"""Refuse weights that do not fill the model: missing, unexpected or wrongly shaped keys.

transformers only warns about them and initialises the missing tensors at random, so a broken
download would otherwise run to exit 0 with a silently random layer. Each backbone family names
the keys that are known to be harmless in one `AllowList`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from utils.errors import UserError

# Rotary frequencies: a buffer computed from the config. Checkpoints of 2023 (FastChat's Vicuna,
# the first llava / Llama conversions) stored it per layer; current transformers recompute it.
ROTARY_INV_FREQ = r"(^|\.)rotary_emb\.inv_freq$"


@dataclass(frozen=True)
class AllowList:
    """Keys a family's checkpoints may hold without the model having them, or lack without harm."""

    unexpected: tuple[str, ...] = ()   # regexes of checkpoint keys the model does not use
    tied: tuple[str, ...] = ()         # regexes of keys that may be missing when the word embeddings are tied

    def allowed_unexpected(self, key: str) -> bool:
        return any(re.search(p, key) for p in self.unexpected)

    def allowed_missing(self, key: str, tied: bool) -> bool:
        return tied and any(re.search(p, key) for p in self.tied)


def _some(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > n else ''})"


def check_loaded_keys(source: str, allow: AllowList, missing=(), unexpected=(), mismatched=(),
                      tied: bool = False) -> None:
    """Raise UserError if `source` (a folder or file) left keys out, held extra ones or had other shapes.

    `mismatched` holds keys, or (key, checkpoint shape, model shape) tuples as transformers reports them.
    """
    missing = sorted(k for k in missing if not allow.allowed_missing(k, tied))
    unexpected = sorted(k for k in unexpected if not allow.allowed_unexpected(k))
    mismatched = sorted(m if isinstance(m, str) else f"{m[0]}: {tuple(m[1])} vs {tuple(m[2])}" for m in mismatched)
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    if mismatched:
        problems.append(f"keys with other shapes (checkpoint vs model) {_some(mismatched, 3)}")
    if problems:
        raise UserError(f"the weights in {source} do not fit the model: {'; '.join(problems)}. A missing key "
                        f"would be random; check that the folder is complete and is the right model")


def check_hf_loading_info(source: str, allow: AllowList, info: dict, tied: bool) -> None:
    """`check_loaded_keys` on what `from_pretrained(..., output_loading_info=True)` reports."""
    check_loaded_keys(source, allow, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                      info.get("mismatched_keys", ()), tied=tied)
    errors = [str(e) for e in info.get("error_msgs", ()) if e]
    if errors:
        raise UserError(f"the weights in {source} could not be loaded: {errors[0][:300]}")
