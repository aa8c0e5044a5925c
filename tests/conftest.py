"""Shared fixtures: tiny backbones (built once per test session) and small images."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models: one thread avoids MKL's multi-threaded per-shape start-up cost (docs/PERFORMANCE.md).
torch.set_num_threads(1)

TINY = ("tiny-blip2", "tiny-llava", "tiny-minigpt4")
_CACHE: dict = {}


def tiny_vllm(name: str):
    """A tiny backbone of the real class; built once per session and shared (treat as read-only)."""
    if name not in _CACHE:
        from editors.vllms import build_tiny

        _CACHE[name] = build_tiny(name)
    return _CACHE[name]


@pytest.fixture(params=TINY)
def vllm(request):
    return tiny_vllm(request.param)


def make_image(seed: int, size: int = 32) -> Image.Image:
    """A random RGB image; different seeds give different pictures."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def real_shape_backbone(real_name: str, tiny_name: str, **spec):
    """A tiny backbone of family `tiny_name` with the real model's depth (`spec`, e.g. num_layers=32),
    saved as a folder in the real layout and loaded back through `load_vllm(real_name, folder)`: what a
    real backbone's editor config is built on in the tests. Folders are made once per session."""
    import atexit
    import shutil
    import tempfile

    from editors.vllms import TinySpec, build_tiny, load_vllm, save_vllm

    key = ("real-shape", real_name, tiny_name, tuple(sorted(spec.items())))
    if key not in _CACHE:
        folder = tempfile.mkdtemp(prefix=f"real-shape-{tiny_name}-")
        atexit.register(shutil.rmtree, folder, True)
        save_vllm(build_tiny(tiny_name, TinySpec(**spec)), folder)
        _CACHE[key] = load_vllm(real_name, path=folder)
    return _CACHE[key]
