"""LLaVA-1.5 (Llama): `LlavaForConditionalGeneration` used piece by piece.

Rows are [BOS][576 projected CLIP patches]["\n" prompt target]: the paper's layout without a chat
template. Features come from `vision_feature_layer` with the CLS token dropped ("default").
"""
from __future__ import annotations

import torch
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

from .base import VLLM
from .stack import stack_for


class LLaVA(VLLM):
    family = "llava"
    image_after_bos = True
    image_text_prefix = "\n"
    image_placeholder = "<image>"

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer, image_processor, name="llava-v1.5-7b"):
        cfg = model.config
        patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        n_tokens = patches if cfg.vision_feature_select_strategy == "default" else patches + 1
        super().__init__(model, stack_for(model.model.language_model, model.lm_head), tokenizer,
                         image_processor, n_tokens, name)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats  # [n, 576, d]

    def save(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)

    @classmethod
    def from_directory(cls, path: str, device="cpu", dtype=None, name="llava-v1.5-7b") -> "LLaVA":
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or torch.float32)
        return cls(model.to(device), AutoTokenizer.from_pretrained(path),
                   AutoImageProcessor.from_pretrained(path), name=name)
