"""`tiny-gemma3`: a tiny random Gemma 3 (transformers' `gemma3` classes), no download.

SigLIP at toy sizes on 64x64 images (8x8 patches), pooled 2x2 to a fixed 16 soft tokens per image
(the real model: 64x64 patches pooled to 256); a Gemma 3 LM with local (sliding-window 24) and
global layers alternating, tied embeddings as on the real models. The tokenizer is trained on the
spot with Gemma's image and turn tokens and its chat template (which writes `{{ bos_token }}`).
"""
from __future__ import annotations

import torch

from .tiny import _MEAN, _STD, TinySpec
from .tokenizer import train_tokenizer

IMAGE, PATCH, SOFT_TOKENS, WINDOW = 64, 8, 16, 24  # image pixels, SigLIP patch, tokens per image, local window
NAMED_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
SPECIALS = ["<start_of_turn>", "<end_of_turn>", *NAMED_TOKENS.values()]
# Gemma 3's chat format: BOS, turns "user" / "model", the image placeholder where the image is, text trimmed.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _processor(cls, spec: TinySpec):
    from transformers import Gemma3ImageProcessorPil

    tok = train_tokenizer(spec.vocab_size)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok._set_model_specific_special_tokens(special_tokens=NAMED_TOKENS)  # tok.boi_token etc., saved too
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, image_mean=_MEAN,
                                              image_std=_STD, do_pan_and_scan=False)
    return cls.processor_class(image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE,
                               image_seq_length=SOFT_TOKENS)


def build(spec: TinySpec, prompt_mode: str):
    from transformers import Gemma3Config

    from .hf_gemma3 import Gemma3
    from .hf_vlm import RAW_SUFFIX

    processor = _processor(Gemma3, spec)
    tok = processor.tokenizer
    head_dim = spec.hidden_size // spec.num_heads
    text = dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_heads // 2, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * (spec.num_layers // 2),
                max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    vision = dict(model_type="siglip_vision_model", hidden_size=spec.vision_hidden_size,
                  intermediate_size=2 * spec.vision_hidden_size, num_hidden_layers=spec.vision_layers,
                  num_attention_heads=spec.num_heads, image_size=IMAGE, patch_size=PATCH, vision_use_head=False)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=SOFT_TOKENS,
                       boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
                       image_token_index=tok.image_token_id, tie_word_embeddings=True)
    model = Gemma3.hf_class(cfg)
    # transformers zero-initialises the projector (meant for loading weights): images would all be 0
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=spec.vision_init_std)
    return Gemma3(model, processor, name="tiny-gemma3" + RAW_SUFFIX * (prompt_mode == "raw"), prompt_mode=prompt_mode)
