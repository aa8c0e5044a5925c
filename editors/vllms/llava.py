"""LLaVA-1.5 (Llama): `LlavaForConditionalGeneration` used piece by piece.

Rows are [BOS][576 projected CLIP patches]["\n" prompt target]: the paper's layout without a chat
template. Features come from `vision_feature_layer` with the CLS token dropped ("default").
"""
from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from .hf_folder import HFFolderVLLM
from .load_report import ROTARY_INV_FREQ, AllowList
from .stack import stack_for


class LLaVA(HFFolderVLLM):
    hf_class = LlavaForConditionalGeneration
    default_name = "llava-v1.5-7b"
    family = "llava"
    # 2023 llava checkpoints carry the Llama rotary buffers; lm_head may be absent only if tied.
    allowed_keys = AllowList(unexpected=(ROTARY_INV_FREQ,), tied=(r"(^|\.)lm_head\.weight$",))
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
