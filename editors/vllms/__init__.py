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
from .hf_vlm import RAW_SUFFIX, HFVLM, Qwen3VL, Qwen25VL
from .hf_gemma3 import Gemma3
from .hf_internvl import InternVL
from .hf_llava_onevision import LlavaOneVision
from .hf_smolvlm import SmolVLM, SmolVLMIdefics3
from .placement import check_module_names, dispatch
from .tiny import TINY_NAMES as _TINY_PAPER, TinySpec, build_tiny
from .tiny_vlm import TINY_VLM_NAMES, build_tiny_vlm

# every tiny name; a processor-driven one also with RAW_SUFFIX (prompts without the chat template)
TINY_NAMES = _TINY_PAPER + TINY_VLM_NAMES + tuple(n + RAW_SUFFIX for n in TINY_VLM_NAMES)

# full name -> (class, short alias, model_type in config.json or None when not an HF folder)
REAL_BACKBONES = {
    "blip2-opt-2.7b": (BLIP2, "blip2", "blip-2"),
    "llava-v1.5-7b": (LLaVA, "llava", "llava"),
    "minigpt-4-vicuna-7b": (MiniGPT4, "minigpt4", None),
    # processor-driven (hf_vlm.py): Qwen/Qwen2.5-VL-7B-Instruct (chat template by default; name + ":raw" for
    # the paper's raw prompts)
    "qwen2.5-vl-7b": (Qwen25VL, "qwen2.5-vl", "qwen2_5_vl"),
    "qwen3-vl-8b": (Qwen3VL, "qwen3-vl", "qwen3_vl"),  # Qwen/Qwen3-VL-8B-Instruct
    "internvl3-8b": (InternVL, "internvl", "internvl"),  # OpenGVLab/InternVL3-8B-hf (hf_internvl.py)
    "gemma3-4b": (Gemma3, "gemma3", "gemma3"),  # google/gemma-3-4b-it (hf_gemma3.py)
    # llava-hf/llava-onevision-qwen2-7b-ov-hf
    "llava-onevision-7b": (LlavaOneVision, "llava-onevision", "llava_onevision"),
    "smolvlm-2b": (SmolVLMIdefics3, "smolvlm", "idefics3"),  # HuggingFaceTB/SmolVLM-Instruct (Idefics3 classes)
    "smolvlm2-2b": (SmolVLM, "smolvlm2", "smolvlm"),  # HuggingFaceTB/SmolVLM2-2.2B-Instruct
}
FAMILY_OF_TINY = {"tiny-blip2": "blip2-opt-2.7b", "tiny-llava": "llava-v1.5-7b", "tiny-minigpt4": "minigpt-4-vicuna-7b",
                  "tiny-qwen2.5-vl": "qwen2.5-vl-7b", "tiny-qwen3-vl": "qwen3-vl-8b",
                  "tiny-internvl": "internvl3-8b", "tiny-gemma3": "gemma3-4b",
                  "tiny-llava-onevision": "llava-onevision-7b", "tiny-smolvlm": "smolvlm2-2b"}
MARKER_FILE = "liveedit_backbone.json"


def vllm_names() -> list[str]:
    return sorted(REAL_BACKBONES) + [v[1] for v in REAL_BACKBONES.values()] + list(TINY_NAMES)


def canonical_name(name: str) -> str:
    """Any accepted spelling -> `blip2-opt-2.7b` | `llava-v1.5-7b` | `minigpt-4-vicuna-7b` | `qwen2.5-vl-7b` |
    `tiny-*`; a processor-driven backbone keeps a trailing `:raw` (the paper's prompts, no chat template)."""
    key = name.strip().lower()
    if key in TINY_NAMES or key in REAL_BACKBONES:
        return key
    base, raw = (key[:-len(RAW_SUFFIX)], RAW_SUFFIX) if key.endswith(RAW_SUFFIX) else (key, "")
    for full, (cls, alias, _) in REAL_BACKBONES.items():
        if base in (full, alias) and (not raw or issubclass(cls, HFVLM)):
            return full + raw
    raise UserError(f"unknown model name {name!r}; valid names: {', '.join(vllm_names())}")


def save_vllm(vllm: VLLM, directory: str) -> None:
    """Save a backbone (tiny or real) so that `load_vllm(vllm.name, directory)` gives it back."""
    os.makedirs(directory, exist_ok=True)
    vllm.save(directory)
    name = vllm.name[:-len(RAW_SUFFIX)] if vllm.name.endswith(RAW_SUFFIX) else vllm.name  # the mode comes
    with open(os.path.join(directory, MARKER_FILE), "w") as f:                         # from the name asked for
        json.dump({"name": name, "family": vllm.family}, f)


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
    base, prompt_mode = (full[:-len(RAW_SUFFIX)], "raw") if full.endswith(RAW_SUFFIX) else (full, "chat")
    if full in TINY_NAMES and not path:
        if base in TINY_VLM_NAMES:
            _refuse_device_map(full, device_map)
            vllm = build_tiny_vlm(base, device=device, prompt_mode=prompt_mode)
        else:
            vllm = build_tiny(full, device=device if device_map is None else "cpu")
        vllm = vllm.to(dtype) if dtype else vllm
        return _placed(vllm, device_map, dtype)
    family = FAMILY_OF_TINY.get(base, base)
    path = resolve_model_path(base, path) if full not in TINY_NAMES else path
    if not os.path.isdir(path):
        raise UserError(f"model folder does not exist: {path}")
    saved_name = full
    if os.path.isfile(os.path.join(path, MARKER_FILE)):
        with open(os.path.join(path, MARKER_FILE)) as f:
            saved_name = json.load(f)["name"]
    _check_architecture(path, family)
    cls = REAL_BACKBONES[family][0]
    if issubclass(cls, HFVLM):  # the prompt mode comes from the name asked for, not from the folder
        _refuse_device_map(full, device_map)
        saved_name = saved_name[:-len(RAW_SUFFIX)] if saved_name.endswith(RAW_SUFFIX) else saved_name
        vllm = cls.from_directory(path, device=device, dtype=dtype, name=saved_name + RAW_SUFFIX * (prompt_mode == "raw"),
                                  prompt_mode=prompt_mode)
    elif issubclass(cls, HFFolderVLLM):  # transformers reads each weight onto its device
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


def _refuse_device_map(name: str, device_map) -> None:
    """Processor-driven backbones (Qwen2.5-VL, Qwen3-VL) run on one device for now."""
    if device_map is not None:
        raise UserError(f"--device_map is not supported yet for {name} (a processor-driven backbone); "
                        f"drop --device_map and pick one device with -dvc")


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
