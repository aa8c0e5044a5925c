"""Backbones stored as one Hugging Face folder: model, tokenizer and image processor side by side."""
from __future__ import annotations

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from .base import VLLM


class HFFolderVLLM(VLLM):
    """`save` / `from_directory` for BLIP-2 and LLaVA; subclasses name the transformers class."""

    hf_class: type = None     # e.g. Blip2ForConditionalGeneration
    default_name: str = ""    # the real backbone's full name

    def save(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    @classmethod
    def from_directory(cls, path: str, device="cpu", dtype=None, name: str | None = None) -> "HFFolderVLLM":
        model = cls.hf_class.from_pretrained(path, dtype=dtype or torch.float32)
        return cls(model.to(device), AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                   name=name or cls.default_name)
