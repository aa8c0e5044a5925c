"""Tiny random processor-driven VLMs (`hf_vlm.py`) from each family's config structure, no download.

`build_tiny_vlm("tiny-qwen2.5-vl")`: the Qwen2.5-VL classes (windowed ViT, 2x2 merger, M-RoPE LM);
`"tiny-qwen3-vl"`: Qwen3-VL's (its deepstack feeds LM layers 0 and 1 from both vision layers);
at toy sizes, a byte-level BPE tokenizer trained on the spot with the family's special tokens and a
chat template of the family's format, and the family's image processor with tiny sizes (images are
resized to between 32x32 and 64x64 pixels: 4 to 16 vision tokens, so the count varies with the
image). The same spec and seed give the same weights and ids.
"""
from __future__ import annotations

import torch

from . import tiny_llava_onevision, tiny_smolvlm  # families whose tiny versions have their own files
from .tiny import _MEAN, _STD, TinySpec
from .tokenizer import train_tokenizer

TINY_VLM_NAMES = ("tiny-qwen2.5-vl", "tiny-qwen3-vl",
                  "tiny-internvl", "tiny-gemma3",  # tiny_internvl.py, tiny_gemma3.py
                  "tiny-llava-onevision", "tiny-smolvlm")

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
# Qwen's chat format (no default system turn): user turn with the image first, then the assistant header.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen_processor(cls, spec: TinySpec):
    """The family's processor: a tokenizer trained here with Qwen's special tokens, Qwen's chat
    format and the Qwen2-VL image processor at tiny sizes (32x32 to 64x64 pixels)."""
    from transformers import Qwen2VLImageProcessorPil

    tok = train_tokenizer(spec.vocab_size)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    image_processor = Qwen2VLImageProcessorPil(  # resizes to multiples of patch_size * merge_size
        patch_size=spec.patch_size, temporal_patch_size=2, merge_size=2, image_mean=_MEAN, image_std=_STD,
        size={"shortest_edge": spec.image_size ** 2, "longest_edge": (2 * spec.image_size) ** 2})
    return cls.processor_class(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_TEMPLATE)


def _qwen_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _qwen_text(spec: TinySpec, tok) -> dict:
    head_dim = spec.hidden_size // spec.num_heads
    half = head_dim // 2  # M-RoPE splits the rotary half into temporal / height / width sections
    sections = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_heads // 2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False)


def _qwen25_vl(spec: TinySpec, prompt_mode: str):
    from transformers import Qwen2_5_VLConfig

    from .hf_vlm import RAW_SUFFIX, Qwen25VL

    processor = _qwen_processor(Qwen25VL, spec)
    tok, merge = processor.tokenizer, 2
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden_size,
                           intermediate_size=2 * spec.vision_hidden_size, num_heads=spec.num_heads,
                           patch_size=spec.patch_size, spatial_merge_size=merge, temporal_patch_size=2,
                           window_size=spec.patch_size * merge * 2, out_hidden_size=spec.hidden_size,
                           fullatt_block_indexes=[spec.vision_layers - 1], initializer_range=spec.vision_init_std),
        text_config=_qwen_text(spec, tok), tie_word_embeddings=False, **_qwen_ids(tok))
    model = Qwen25VL.hf_class(cfg)
    return Qwen25VL(model, processor, name="tiny-qwen2.5-vl" + RAW_SUFFIX * (prompt_mode == "raw"), prompt_mode=prompt_mode)


def _qwen3_vl(spec: TinySpec, prompt_mode: str):
    from transformers import Qwen3VLConfig

    from .hf_vlm import RAW_SUFFIX, Qwen3VL

    processor = _qwen_processor(Qwen3VL, spec)
    tok = processor.tokenizer
    grid = 2 * spec.image_size // spec.patch_size  # learned position grid of the largest image
    text = _qwen_text(spec, tok)
    text["head_dim"] = spec.hidden_size // spec.num_heads
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden_size,
                           intermediate_size=2 * spec.vision_hidden_size, num_heads=spec.num_heads,
                           patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=spec.hidden_size, num_position_embeddings=grid * grid,
                           deepstack_visual_indexes=list(range(spec.vision_layers)),  # feeds LM layers 0..k-1
                           initializer_range=spec.vision_init_std),
        text_config=text, tie_word_embeddings=False, **_qwen_ids(tok))
    model = Qwen3VL.hf_class(cfg)
    return Qwen3VL(model, processor, name="tiny-qwen3-vl" + RAW_SUFFIX * (prompt_mode == "raw"), prompt_mode=prompt_mode)


def build_tiny_vlm(name: str, spec: TinySpec | None = None, device="cpu", prompt_mode: str = "chat"):
    """A tiny random processor-driven backbone named `name` (one of TINY_VLM_NAMES)."""
    spec = spec or TinySpec()
    from . import tiny_gemma3, tiny_internvl

    builders = {"tiny-qwen2.5-vl": _qwen25_vl, "tiny-qwen3-vl": _qwen3_vl,
                "tiny-internvl": tiny_internvl.build, "tiny-gemma3": tiny_gemma3.build,
                "tiny-llava-onevision": tiny_llava_onevision.build, "tiny-smolvlm": tiny_smolvlm.build}
    if name not in builders:
        raise ValueError(f"unknown tiny VLM {name!r}; choose from {TINY_VLM_NAMES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        vllm = builders[name](spec, prompt_mode)
    return vllm.to(device)
