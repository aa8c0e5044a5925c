"""Tiny random backbones of the real classes, for tests and the toy-world demo (no download).

`build_tiny("tiny-blip2" | "tiny-llava" | "tiny-minigpt4", spec)` makes a small model of the same
transformers classes as the real backbone, with a tokenizer trained on the spot. The same spec
and seed give the same weights and ids. `vllm.save(dir)` then `load_vllm(family, dir)` goes
through the exact code path real weights use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import (BlipImageProcessorPil, Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig,
                          Blip2VisionConfig, CLIPImageProcessorPil, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration)

from .tokenizer import train_tokenizer

TINY_NAMES = ("tiny-blip2", "tiny-llava", "tiny-minigpt4")
_MEAN, _STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@dataclass
class TinySpec:
    """Sizes of a tiny backbone. Fields map onto the transformers configs of each family."""

    hidden_size: int = 64         # LM width
    num_layers: int = 4           # LM decoder layers
    num_heads: int = 4
    vision_hidden_size: int = 64
    vision_layers: int = 2
    image_size: int = 32
    patch_size: int = 8
    num_query_tokens: int = 8     # BLIP-2 / MiniGPT-4 image tokens (LLaVA: one per patch)
    vocab_size: int = 1024
    seed: int = 0
    vision_init_std: float = 0.02  # vision encoder init std (all of it for BLIP-2 / MiniGPT-4, embeddings for CLIP)


def _vision(spec: TinySpec) -> dict:
    # `initializer_range` matters: Blip2VisionConfig defaults to 1e-10 (meant for loading weights),
    # which leaves a randomly initialised vision encoder all but dead.
    return dict(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                num_hidden_layers=spec.vision_layers, num_attention_heads=spec.num_heads,
                image_size=spec.image_size, patch_size=spec.patch_size,
                initializer_range=spec.vision_init_std)


def _qformer(spec: TinySpec) -> dict:
    return dict(hidden_size=spec.vision_hidden_size, num_hidden_layers=2, num_attention_heads=spec.num_heads,
                intermediate_size=2 * spec.vision_hidden_size, encoder_hidden_size=spec.vision_hidden_size,
                cross_attention_frequency=1, vocab_size=spec.vocab_size)


def _llama(spec: TinySpec, tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=2 * spec.hidden_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_heads, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)


def _blip_processor(spec: TinySpec) -> BlipImageProcessorPil:
    return BlipImageProcessorPil(size={"height": spec.image_size, "width": spec.image_size}, resample=Image.BICUBIC,
                              image_mean=_MEAN, image_std=_STD, do_convert_rgb=True)


def build_tiny(name: str, spec: TinySpec | None = None, device="cpu"):
    """A tiny random backbone named `name` (one of TINY_NAMES)."""
    from .blip2 import BLIP2
    from .llava import LLaVA
    from .minigpt4 import MiniGPT4, MiniGPT4Model

    spec = spec or TinySpec()
    tok = train_tokenizer(spec.vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if name == "tiny-blip2":
            cfg = Blip2Config(vision_config=_vision(spec), qformer_config=_qformer(spec),
                              text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=spec.hidden_size,
                                               num_hidden_layers=spec.num_layers, ffn_dim=2 * spec.hidden_size,
                                               num_attention_heads=spec.num_heads, max_position_embeddings=256,
                                               word_embed_proj_dim=spec.hidden_size, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                              num_query_tokens=spec.num_query_tokens, image_token_index=tok.unk_token_id)
            model = Blip2ForConditionalGeneration(cfg)
            # transformers zero-initialises the query tokens: identical queries stay identical forever.
            torch.nn.init.normal_(model.query_tokens, std=0.02)
            vllm = BLIP2(model, tok, _blip_processor(spec), name=name)
        elif name == "tiny-llava":
            cfg = LlavaConfig(vision_config=dict(model_type="clip_vision_model", projection_dim=spec.hidden_size,
                                                 **_vision(spec)),
                              text_config=dict(model_type="llama", **_llama(spec, tok)),
                              image_token_index=tok.unk_token_id, vision_feature_layer=-2,
                              vision_feature_select_strategy="default",
                              image_seq_length=(spec.image_size // spec.patch_size) ** 2)
            proc = CLIPImageProcessorPil(size={"shortest_edge": spec.image_size},
                                      crop_size={"height": spec.image_size, "width": spec.image_size},
                                      image_mean=_MEAN, image_std=_STD, do_convert_rgb=True)
            vllm = LLaVA(LlavaForConditionalGeneration(cfg), tok, proc, name=name)
        elif name == "tiny-minigpt4":
            llama = LlamaForCausalLM(LlamaConfig(**_llama(spec, tok)))
            model = MiniGPT4Model(Blip2VisionConfig(**_vision(spec)), Blip2QFormerConfig(**_qformer(spec)),
                                  llama, spec.num_query_tokens)
            torch.nn.init.normal_(model.query_tokens, std=0.02)
            vllm = MiniGPT4(model, tok, _blip_processor(spec), name=name)
        else:
            raise ValueError(f"unknown tiny backbone {name!r}; choose from {TINY_NAMES}")
    return vllm.to(device)
