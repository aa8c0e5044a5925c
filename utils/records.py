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

from dataclasses import dataclass, field


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
