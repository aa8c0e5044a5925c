"""BLIP-2 (OPT): `Blip2ForConditionalGeneration` used piece by piece.

The image's 32 projected Q-Former outputs go before the text's BOS, as in the paper's code. We
splice the features ourselves instead of using placeholder tokens (transformers 5.x silently drops
the image when placeholders are missing), and check the feature count on every batch.
"""
from __future__ import annotations

import torch
from transformers import Blip2ForConditionalGeneration

from .hf_folder import HFFolderVLLM
from .load_report import AllowList
from .stack import stack_for


class BLIP2(HFFolderVLLM):
    hf_class = Blip2ForConditionalGeneration
    default_name = "blip2-opt-2.7b"
    family = "blip2"
    # OPT has learned positions (no rotary buffers) and ties lm_head to the word embeddings.
    allowed_keys = AllowList(unexpected=(), tied=(r"^language_model\.lm_head\.weight$",))
    image_after_bos = False
    image_text_prefix = ""

    def __init__(self, model: Blip2ForConditionalGeneration, tokenizer, image_processor, name="blip2-opt-2.7b"):
        lm = model.language_model  # OPTForCausalLM
        super().__init__(model, stack_for(lm.model.decoder, lm.lm_head), tokenizer, image_processor,
                         model.config.num_query_tokens, name)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, return_dict=True).pooler_output  # [n, 32, d]
