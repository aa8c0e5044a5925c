"""Backbones: `load_vllm(name, path=None, device="cpu", dtype=None, device_map=None)`.

Real backbones load from a local folder (flag > env var > YAML of paths, see `paths.py`); tiny
ones are built from configs, or loaded from a folder written by `save_vllm`.
"""
from __future__ import annotations

import json
import os

import torch

from utils.devices import resolve_device, resolve_device_map, resolve_dtype, tune_cpu_threads
from utils.errors import UserError
from utils.io import read_json
from .base import VLLM
from .batch import VLLMBatch
from .blip2 import BLIP2
from .hf_folder import HFFolderVLLM
from .llava import LLaVA
from .minigpt4 import MiniGPT4
from .paths import resolve_model_path
from .placement import check_module_names, dispatch
from .tiny import TINY_NAMES, TinySpec, build_tiny

# full name -> (class, short alias, model_type in config.json or None when not an HF folder)
REAL_BACKBONES = {
    "blip2-opt-2.7b": (BLIP2, "blip2", "blip-2"),
    "llava-v1.5-7b": (LLaVA, "llava", "llava"),
    "minigpt-4-vicuna-7b": (MiniGPT4, "minigpt4", None),
}
FAMILY_OF_TINY = {"tiny-blip2": "blip2-opt-2.7b", "tiny-llava": "llava-v1.5-7b", "tiny-minigpt4": "minigpt-4-vicuna-7b"}
MARKER_FILE = "liveedit_backbone.json"


def vllm_names() -> list[str]:
    return sorted(REAL_BACKBONES) + [v[1] for v in REAL_BACKBONES.values()] + list(TINY_NAMES)


def canonical_name(name: str) -> str:
    """Any accepted spelling -> `blip2-opt-2.7b` | `llava-v1.5-7b` | `minigpt-4-vicuna-7b` | `tiny-*`."""
    key = name.strip().lower()
    if key in TINY_NAMES or key in REAL_BACKBONES:
        return key
    for full, (_, alias, _) in REAL_BACKBONES.items():
        if key == alias:
            return full
    raise UserError(f"unknown model name {name!r}; valid names: {', '.join(vllm_names())}")


def save_vllm(vllm: VLLM, directory: str) -> None:
    """Save a backbone (tiny or real) so that `load_vllm(vllm.name, directory)` gives it back."""
    os.makedirs(directory, exist_ok=True)
    vllm.save(directory)
    with open(os.path.join(directory, MARKER_FILE), "w") as f:
        json.dump({"name": vllm.name, "family": vllm.family}, f)


def _check_architecture(path: str, full: str) -> None:
    expected = REAL_BACKBONES[full][2]
    config_path = os.path.join(path, "config.json")
    if expected is None:
        return
    if not os.path.isfile(config_path):
        raise UserError(f"{path} has no config.json: not a Hugging Face folder for {full}")
    found = read_json(config_path, hint="copy the model folder again").get("model_type")
    if found != expected:
        raise UserError(f"{path} holds a {found!r} model, but {full} needs model_type {expected!r}")


def load_vllm(name: str, path: str | None = None, device="cpu", dtype=None, device_map=None, say=None) -> VLLM:
    """Load backbone `name` on `device`; tiny names without a path are built from configs.

    `dtype`: "auto" (bfloat16 on a CUDA device that supports it, else float32), "float32",
    "bfloat16", "float16", a torch dtype, or None (float32). Real weights are read in it directly.

    `device_map` spreads the backbone over several devices of this process: None / "none" (all on
    `device`), "auto" (over the visible GPUs; without CUDA a note through `say` and all on `device`),
    a path to a JSON file or a dict {module name in `vllm.model`: device}. Then `vllm.device` is where
    inputs go (the input embeddings' device) and `vllm.device_of_layer(i)` where decoder layer i runs.

    Tiny backbones on CPU switch torch to one thread (see `utils.devices.tune_cpu_threads`).
    """
    full = canonical_name(name)
    device = resolve_device(device)
    device_map = resolve_device_map(device_map, device, say=say)
    dtype = resolve_dtype(dtype, _dtype_device(device, device_map))
    tune_cpu_threads(full, device)
    if full in TINY_NAMES and not path:
        vllm = build_tiny(full, device=device if device_map is None else "cpu")
        vllm = vllm.to(dtype) if dtype else vllm
        return _placed(vllm, device_map, dtype)
    family = FAMILY_OF_TINY.get(full, full)
    path = resolve_model_path(full, path) if full not in TINY_NAMES else path
    if not os.path.isdir(path):
        raise UserError(f"model folder does not exist: {path}")
    saved_name = full
    if os.path.isfile(os.path.join(path, MARKER_FILE)):
        with open(os.path.join(path, MARKER_FILE)) as f:
            saved_name = json.load(f)["name"]
    _check_architecture(path, family)
    cls = REAL_BACKBONES[family][0]
    if issubclass(cls, HFFolderVLLM):  # transformers reads each weight onto its device
        vllm = cls.from_directory(path, device=device, dtype=dtype, name=saved_name, device_map=device_map)
    else:  # assembled in CPU memory, then placed
        vllm = cls.from_directory(path, device=device if device_map is None else "cpu", dtype=dtype, name=saved_name)
        vllm = _placed(vllm, device_map, dtype)
    vllm.source = os.path.realpath(path)
    return vllm


def _dtype_device(device, device_map) -> torch.device:
    """The device `--dtype auto` asks about: `device`, or the first GPU of the map."""
    if device_map is None:
        return device
    if device_map == "auto":
        return torch.device("cuda:0")
    gpus = [d for d in device_map.values() if d.startswith("cuda")]
    return torch.device(gpus[0] if gpus else "cpu")


def _placed(vllm: VLLM, device_map, dtype) -> VLLM:
    """`vllm` with its modules placed by `device_map` (None: unchanged)."""
    if device_map is None:
        return vllm
    if isinstance(device_map, dict):
        check_module_names(vllm.model, device_map, "--device_map")
    dispatch(vllm.model, device_map, dtype)
    return vllm


__all__ = ["VLLM", "VLLMBatch", "load_vllm", "save_vllm", "canonical_name", "vllm_names", "build_tiny", "TinySpec",
           "TINY_NAMES"]
