"""`tiny-llava-onevision`: LLaVA-OneVision's classes at toy sizes, no download.

SigLIP vision tower (2 layers, 32x32 tiles of 8x8 patches: 16 tokens per tile), the MLP projector,
a Qwen2 LM (4 layers, width 64); anyres over the grids 1x1, 1x2, 2x1 and 2x2 of 32-px tiles, so an
image becomes 16 to 88 image tokens depending on its size and aspect ratio (base tile 16, grid
features, one newline per grid row; 36 for a 32x32 image). The tokenizer is trained on the spot with Qwen's chat tokens
and `<image>` / `<video>`; the chat template has LLaVA-OneVision's format (images first in the user
turn, then a newline and the text).
"""
from __future__ import annotations

from .tiny import _MEAN, _STD, TinySpec
from .tokenizer import train_tokenizer

SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# LLaVA-OneVision's chat format: "<|im_start|>user " + one <image> per image + "\n" + text + "<|im_end|>"
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ '\\n' + c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build(spec: TinySpec, prompt_mode: str):
    """The tiny random backbone (`prompt_mode` "raw": the name ends in ":raw")."""
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    from .hf_llava_onevision import LlavaOneVision
    from .hf_vlm import RAW_SUFFIX

    tile = spec.image_size
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    tok = train_tokenizer(spec.vocab_size)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints, image_mean=_MEAN, image_std=_STD)
    tile_tokens = (tile // spec.patch_size) ** 2
    processor = LlavaOneVision.processor_class(
        image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE, num_image_tokens=tile_tokens,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    ids = tok.convert_tokens_to_ids
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=spec.vision_hidden_size,
                           intermediate_size=2 * spec.vision_hidden_size, num_hidden_layers=spec.vision_layers,
                           num_attention_heads=spec.num_heads, image_size=tile, patch_size=spec.patch_size,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=spec.hidden_size,
                         intermediate_size=2 * spec.hidden_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads // 2,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False)
    name = "tiny-llava-onevision" + RAW_SUFFIX * (prompt_mode == "raw")
    return LlavaOneVision(LlavaOneVision.hf_class(cfg), processor, name=name, prompt_mode=prompt_mode)
