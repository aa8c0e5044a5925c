"""Saved edits of the baselines that hold tensors: one safetensors file and a small JSON manifest.

`save_state` writes both atomically; `load_state` checks that the folder holds edits of this
editor on this backbone (and whatever else the caller names in `expect`) before returning them.
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from utils.errors import UserError
from utils.io import read_json, write_atomic, write_json_atomic
from utils.records import Sample

TENSORS_FILE = "edits.safetensors"
MANIFEST_FILE = "edits.json"


def save_state(directory: str, tensors: dict[str, torch.Tensor], manifest: dict) -> None:
    """Write `tensors` (moved to CPU) and `manifest` (JSON-able) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomic(os.path.join(directory, TENSORS_FILE), lambda tmp: save_file(cpu, tmp))
    write_json_atomic(os.path.join(directory, MANIFEST_FILE), manifest, indent=2)


def load_state(directory: str, expect: dict, device: str | torch.device = "cpu"
               ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors on `device`, manifest) saved in `directory`; every key of `expect` must match the manifest."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{directory} holds no saved {expect.get('editor')} edits ({MANIFEST_FILE} is missing)")
    manifest = read_json(path)
    wrong = {k: manifest.get(k) for k, v in expect.items() if manifest.get(k) != v}
    if wrong:
        raise UserError(f"{directory} holds other edits: {wrong}, expected "
                        f"{ {k: expect[k] for k in wrong} }")
    return load_file(os.path.join(directory, TENSORS_FILE), device=str(device)), manifest


def identity(editor, **extra) -> dict:
    """What saved edits must match to load: the editor, the backbone, and `extra` (e.g. the edited module)."""
    return {"editor": editor.name, "backbone": editor.vllm.name, **extra}


def request_entries(requests: list[Sample]) -> list[list]:
    """Requests for a manifest: [prompt, target, image path] (an in-memory image is recorded as null)."""
    return [[r.prompt, r.target, r.image if isinstance(r.image, str) else None] for r in requests]


def requests_from(entries: list[list]) -> list[Sample]:
    return [Sample(prompt, target, image) for prompt, target, image in entries]
