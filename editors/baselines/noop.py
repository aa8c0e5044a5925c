"""`none`: an editor that changes nothing — the unedited model seen through the evaluation harness.

Its reliability is the unedited model's accuracy on the new targets, its locality is 1.0 by
definition; the demo reports it as the "unedited" row.
"""
from __future__ import annotations

from dataclasses import dataclass

from editors.base import Editor
from utils.records import Sample


@dataclass
class NoEditConfig:
    """No settings."""


class NoEdit(Editor):
    name = "none"
    config_class = NoEditConfig
    supports_batch_edit = True  # counting a chunk at once is the same as one by one

    def __init__(self, vllm, config: NoEditConfig):
        super().__init__(vllm, config)
        self._count = 0

    @property
    def num_edits(self) -> int:
        return self._count

    def edit(self, requests: list[Sample]) -> None:
        self._count += len(requests)

    def restore(self) -> None:
        self._count = 0
