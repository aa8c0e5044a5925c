"""The normalised edit record that every dataset reader produces.

One record = one edit request plus the queries that measure it:
- `requests`: what to edit (reliability is scored on these, with `target` = the new answer);
- `generality`: {"text_rephrase": [...], "image_rephrase": [...]} (T-Gen, M-Gen);
- `locality`: {"text_loc": [...], "image_loc": [...]} (T-Loc, M-Loc; text_loc has no image);
- `portability`: one-hop questions whose answer must follow the edit (VLKEB one-hop only);
- `portability_edits`: VLKEB's second, text-only edit of each one-hop question (`port_edit_q` ->
  `port_edit_a`), made right after the record's edit when the protocol asks for it.
Images are paths (resolved against the image root), never pixels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Sample:
    """One (image, prompt, target) query. `image` is a path, or None for text-only."""

    prompt: str
    target: str
    image: str | None = None


@dataclass
class EditRecord:
    requests: list[Sample]
    generality: dict[str, list[Sample]]
    locality: dict[str, list[Sample]]
    portability: list[Sample] = field(default_factory=list)
    portability_edits: list[Sample] = field(default_factory=list)  # aligned with `portability`
    original_answer: str | None = None  # the dataset's `pred`: what the unedited model answered
    index: int = -1  # position in the source file, for error messages and result files


GENERALITY_TYPES = ("text_rephrase", "image_rephrase")
LOCALITY_TYPES = ("text_loc", "image_loc")


def data_fingerprint(records: Sequence[EditRecord], relative_to: str | None = None) -> str:
    """SHA-1 of the records' full content (every field, in order): same hash = same data.

    With `relative_to` (the data folder), image paths are hashed relative to it, so the same data
    read through another spelling of the folder (`data`, `./data`, an absolute path, a copy on
    another disk) gives the same hash; without it, image paths count as written.
    """
    content = [dataclasses.asdict(r) for r in records]
    if relative_to is not None:
        content = _relative_images(content, os.path.abspath(relative_to))
    payload = json.dumps(content, sort_keys=True)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def _relative_images(value, root: str):
    """`value` (asdict output) with every `image` path made relative to `root`."""
    if isinstance(value, dict):
        return {k: (os.path.relpath(os.path.abspath(v), root) if k == "image" and isinstance(v, str)
                    else _relative_images(v, root)) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_images(v, root) for v in value]
    return value
