"""The expert repository: routing keys and low-rank experts of every edit so far (spec §6.3).

Preallocated tensors that grow by an eighth when full, stored in a chosen dtype. No
concatenation per edit: 10,000 edits copy O(n) data (about 9 copies of each expert), not O(n^2);
at most 1/9 of the allocation is unused; one large add, such as a load, allocates exactly what it
needs. `save`/`load` write safetensors plus a JSON manifest of the requests (image paths, never
pixels), so a lifelong run can stop and continue.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from utils.errors import UserError
from utils.io import write_atomic, write_json_atomic
from utils.records import Sample

FIELDS = ("query_keys", "vision_keys", "up", "down")  # eqr, evr, U, V in the paper's names


class ExpertRepository:
    """query_keys, vision_keys [n, e, md]; up (U), down (V) [n, r, D]; requests: one Sample per edit."""

    def __init__(self, eqe_n: int, module_dim: int, rank: int, hidden: int, dtype=torch.float32,
                 device="cpu", capacity: int = 16):
        self.shapes = {"query_keys": (eqe_n, module_dim), "vision_keys": (eqe_n, module_dim),
                       "up": (rank, hidden), "down": (rank, hidden)}
        self.dtype, self.device = dtype, torch.device(device)
        self.size = 0
        self.requests: list[Sample] = []
        self._store = {k: torch.empty(capacity, *s, dtype=dtype, device=self.device) for k, s in self.shapes.items()}

    @property
    def capacity(self) -> int:
        return self._store["up"].shape[0]

    def __len__(self) -> int:
        return self.size

    def view(self, name: str) -> torch.Tensor:
        """The first `size` rows of one field (no copy)."""
        return self._store[name][:self.size]

    def _grow_to(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        capacity = max(needed, self.capacity + max(self.capacity // 8, 1))  # geometric: O(1) copies per edit
        for name, old in self._store.items():
            new = torch.empty(capacity, *old.shape[1:], dtype=self.dtype, device=self.device)
            new[:self.size] = old[:self.size]
            self._store[name] = new

    def add(self, requests: list[Sample], **fields: torch.Tensor) -> None:
        """Append n edits: each field [n, ...] matching the repository's shapes."""
        n = len(requests)
        self._grow_to(self.size + n)
        for name in FIELDS:
            self._store[name][self.size:self.size + n] = fields[name].detach().to(self.device, self.dtype)
        self.size += n
        self.requests.extend(requests)

    def clear(self) -> None:
        self.size = 0
        self.requests = []

    def save(self, directory: str, info: dict | None = None) -> None:
        """`experts.safetensors` + `manifest.json`, each written atomically."""
        os.makedirs(directory, exist_ok=True)
        tensors = {name: self.view(name).contiguous().cpu() for name in FIELDS}
        manifest = {"size": self.size, "dtype": str(self.dtype).replace("torch.", ""), "shapes": self.shapes,
                    "info": info or {},
                    "requests": [_request_entry(s) for s in self.requests]}
        write_atomic(os.path.join(directory, "experts.safetensors"), lambda tmp: save_file(tensors, tmp))
        write_json_atomic(os.path.join(directory, "manifest.json"), manifest, indent=1)

    def load(self, directory: str) -> dict:
        """Replace the contents with a saved repository; returns the saved `info`."""
        manifest_path = os.path.join(directory, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise UserError(f"no saved expert repository in {directory} (manifest.json missing)")
        with open(manifest_path) as f:
            manifest = json.load(f)
        try:
            tensors = load_file(os.path.join(directory, "experts.safetensors"))
        except Exception as exc:
            raise UserError(f"cannot read {directory}/experts.safetensors: {exc}") from exc
        for name in FIELDS:
            expected = (manifest["size"], *self.shapes[name])
            if tuple(tensors[name].shape) != expected:
                raise UserError(f"saved repository field {name} has shape {list(tensors[name].shape)}, "
                                f"this editor expects {list(expected)}")
        self.clear()
        self.add([Sample(**r) for r in manifest["requests"]], **tensors)
        return manifest.get("info", {})


def _request_entry(sample: Sample) -> dict:
    """A request for the manifest: image paths are kept; in-memory images are recorded as null."""
    image = sample.image if isinstance(sample.image, str) or sample.image is None else None
    return {"prompt": sample.prompt, "target": sample.target, "image": image}
