"""`tiny-internvl`: a tiny random InternVL3 (transformers' `internvl` classes), no download.

InternViT with a CLS token at toy sizes, the pixel-shuffle MLP projector, a Qwen2 LM; the GotOcr2
image processor cuts an image into 32x32 tiles (1 to 4 by its aspect ratio, plus a thumbnail when
there are several), 16 LM tokens per tile: 16 tokens for a square image, up to 80 for a wide one.
The tokenizer is trained on the spot with InternVL's special tokens and its ChatML template.
"""
from __future__ import annotations

from .tiny import _MEAN, _STD, TinySpec
from .tokenizer import train_tokenizer

TILE, PATCH, MAX_TILES = 32, 4, 4  # tile pixels, ViT patch pixels, most tiles per image (+ thumbnail)
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
SPECIALS = ["<|im_start|>", "<|im_end|>", *NAMED_TOKENS.values()]
# InternVL3's chat format (the -hf releases): ChatML, the image as "<IMG_CONTEXT>\n" before the text.
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _processor(cls, spec: TinySpec):
    from transformers import GotOcr2ImageProcessorPil

    tok = train_tokenizer(spec.vocab_size)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok._set_model_specific_special_tokens(special_tokens=NAMED_TOKENS)  # tok.start_image_token etc., saved too
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES,
        image_mean=_MEAN, image_std=_STD)
    per_tile = (TILE // PATCH // 2) ** 2  # pixel shuffle 0.5: 2x2 patches -> one token
    return cls.processor_class(image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE,
                               image_seq_length=per_tile)


def build(spec: TinySpec, prompt_mode: str):
    from transformers import InternVLConfig

    from .hf_internvl import InternVL
    from .hf_vlm import RAW_SUFFIX

    processor = _processor(InternVL, spec)
    tok = processor.tokenizer
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=spec.vision_hidden_size, num_hidden_layers=spec.vision_layers,
                           num_attention_heads=spec.num_heads, intermediate_size=2 * spec.vision_hidden_size,
                           image_size=TILE, patch_size=PATCH, initializer_range=spec.vision_init_std),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=spec.hidden_size,
                         intermediate_size=2 * spec.hidden_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads // 2,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False),
        image_token_id=tok.context_image_token_id, image_seq_length=processor.image_seq_length,
        downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False)
    model = InternVL.hf_class(cfg)
    return InternVL(model, processor, name="tiny-internvl" + RAW_SUFFIX * (prompt_mode == "raw"), prompt_mode=prompt_mode)
