"""MiniGPT-4 (Vicuna) assembled from transformers parts, no salesforce-lavis.

EVA ViT-g + ln_vision  = `Blip2VisionModel` (its `post_layernorm` is ln_vision),
query tokens + Q-Former = `Blip2QFormerModel`, `llama_proj` = `nn.Linear`, Vicuna = `LlamaForCausalLM`.
Rows are [BOS][32 image tokens]["\n" prompt target], the paper's "<ImageHere>\n" layout.

Two on-disk formats load here:
- converted (what `save` writes): `minigpt4.json` (vision / Q-Former configs), `bridge.safetensors`
  (vision, Q-Former, query tokens, projection), `llama/` (an HF Llama directory with tokenizer),
  `image_processor/`;
- the original release: a folder with `model_config.yaml` naming the Vicuna folder, the EVA ViT-g
  weights, the BLIP-2 Q-Former checkpoint and the MiniGPT-4 projection checkpoint
  (see `minigpt4_release.py`).
Both load in three steps: cheap checks (files, tokenizer, shards, every bridge key and shape against
a model built on the meta device), then Vicuna read directly in the chosen dtype, then the bridge
tensors cast to that dtype as they are read.

The vision side (ViT, Q-Former, projection) runs under fp16 autocast on CUDA by default, as the
authors ran it (`vision_fp16_autocast`: None = on for CUDA only, True, False).
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import (AutoConfig, Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel,
                          LlamaForCausalLM)

from utils.errors import UserError
from .base import VLLM
from .hf_parts import check_processor_file, check_tokenizer_files, load_image_processor, load_tokenizer
from .load_report import ROTARY_INV_FREQ, AllowList, check_hf_loading_info, check_loaded_keys
from .stack import stack_for
from .weight_files import check_weight_file, hf_weight_files

# Vicuna checkpoints of 2023 (FastChat) store the rotary buffers; lm_head may be absent only if tied.
VICUNA_ALLOWED_KEYS = AllowList(unexpected=(ROTARY_INV_FREQ,), tied=(r"^lm_head\.weight$",))


class MiniGPT4Model(nn.Module):
    """The MiniGPT-4 network; submodule names follow the original (`visual_encoder`, `Qformer`, ...)."""

    def __init__(self, vision_config: Blip2VisionConfig, qformer_config: Blip2QFormerConfig,
                 llama_model: LlamaForCausalLM, num_query_tokens: int = 32):
        super().__init__()
        self.visual_encoder = Blip2VisionModel(vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, qformer_config.hidden_size))
        self.Qformer = Blip2QFormerModel(qformer_config)
        self.llama_proj = nn.Linear(qformer_config.hidden_size, llama_model.config.hidden_size)
        self.llama_model = llama_model

    def bridge_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the LLM (saved separately as an HF folder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llama_model.")}

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.visual_encoder(pixel_values=pixel_values).last_hidden_state  # [n, 257, dv] (ln_vision applied)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)  # [n, 32, dq]
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        q = self.Qformer(query_embeds=queries, encoder_hidden_states=image,
                         encoder_attention_mask=image_mask).last_hidden_state  # [n, 32, dq]
        return self.llama_proj(q)  # [n, 32, d]


def check_llama_folder(folder: str) -> None:
    """Vicuna's folder: config, tokenizer files and every weight shard, checked without reading weights."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{folder} has no config.json: not a Hugging Face Llama / Vicuna folder")
    check_tokenizer_files(folder)
    hf_weight_files(folder)


def load_llama(folder: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """Vicuna read directly in `dtype`; any missing / unexpected key beyond the allow-list is a UserError."""
    llama, info = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True,
                                                   ignore_mismatched_sizes=True)
    check_hf_loading_info(folder, VICUNA_ALLOWED_KEYS, info, tied=llama.config.tie_word_embeddings)
    return llama


def meta_model(vision_config, qformer_config, llama_folder: str, num_query_tokens: int) -> MiniGPT4Model:
    """MiniGPT-4 with no storage (meta device): its keys and shapes, for checks before any load."""
    with torch.device("meta"):
        llama = LlamaForCausalLM(AutoConfig.from_pretrained(llama_folder))
        return MiniGPT4Model(vision_config, qformer_config, llama, num_query_tokens)


def check_bridge_shapes(model: MiniGPT4Model, shapes: Mapping[str, tuple], source: str) -> None:
    """Every bridge key of `model` present in `shapes` (key -> shape of the checkpoint), none extra, same shapes."""
    expected = {k: tuple(v.shape) for k, v in model.bridge_state_dict().items()}
    mismatched = [(k, shapes[k], expected[k]) for k in sorted(set(shapes) & set(expected))
                  if tuple(shapes[k]) != expected[k]]
    check_loaded_keys(source, AllowList(), missing=set(expected) - set(shapes), unexpected=set(shapes) - set(expected),
                      mismatched=mismatched)


def fill_model(model: MiniGPT4Model, llama: LlamaForCausalLM, state: Mapping[str, torch.Tensor], device,
               dtype: torch.dtype) -> MiniGPT4Model:
    """Put the loaded `llama` and the bridge tensors (cast to `dtype` on `device` as read) into a meta `model`."""
    model.llama_model = llama.to(device)
    model.load_state_dict({k: v.to(device=device, dtype=dtype, copy=True) for k, v in state.items()},
                          strict=False, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # check_bridge_shapes ran first, so this is a bug, not a user error
        raise RuntimeError(f"MiniGPT-4 parameters left unloaded: {left[:5]}")
    return model


class MiniGPT4(VLLM):
    family = "minigpt4"
    image_after_bos = True
    image_text_prefix = "\n"
    image_placeholder = "<ImageHere>"

    def __init__(self, model: MiniGPT4Model, tokenizer, image_processor, name="minigpt-4-vicuna-7b",
                 vision_fp16_autocast: bool | None = None):
        lm = model.llama_model
        super().__init__(model, stack_for(lm.model, lm.lm_head), tokenizer, image_processor,
                         model.query_tokens.shape[1], name)
        self.vision_fp16_autocast = vision_fp16_autocast  # images under fp16 autocast? None = on CUDA only

    def vision_autocast_on(self) -> bool:
        flag = self.vision_fp16_autocast
        return self.device.type == "cuda" if flag is None else bool(flag)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.vision_autocast_on():
            return self.model.encode_images(pixel_values)
        with torch.autocast(self.device.type, dtype=torch.float16):
            features = self.model.encode_images(pixel_values)  # [n, 32, d] in float16
        return features.to(self.dtype)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        meta = {"format": "liveedit-minigpt4", "num_query_tokens": self.num_image_tokens,
                "vision_config": self.model.visual_encoder.config.to_dict(),
                "qformer_config": self.model.Qformer.config.to_dict(),
                "vision_fp16_autocast": self.vision_fp16_autocast}
        with open(os.path.join(directory, "minigpt4.json"), "w") as f:
            json.dump(meta, f, indent=2)
        save_file({k: v.contiguous() for k, v in self.model.bridge_state_dict().items()},
                  os.path.join(directory, "bridge.safetensors"))
        self.model.llama_model.save_pretrained(os.path.join(directory, "llama"))
        self.tokenizer.save_pretrained(os.path.join(directory, "llama"))
        self.image_processor.save_pretrained(os.path.join(directory, "image_processor"))

    @classmethod
    def from_directory(cls, path: str, device="cpu", dtype=None, name="minigpt-4-vicuna-7b") -> "MiniGPT4":
        if os.path.isfile(os.path.join(path, "model_config.yaml")):
            from .minigpt4_release import load_release

            return load_release(path, device=device, dtype=dtype, name=name)
        meta_path = os.path.join(path, "minigpt4.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{path} is not a MiniGPT-4 folder: expected minigpt4.json (converted format) or "
                            f"model_config.yaml (the original release layout)")
        with open(meta_path) as f:
            meta = json.load(f)
        dtype = dtype or torch.float32
        llama_dir, bridge = os.path.join(path, "llama"), os.path.join(path, "bridge.safetensors")
        check_llama_folder(llama_dir)
        check_processor_file(os.path.join(path, "image_processor"))
        check_weight_file(bridge)
        model = meta_model(Blip2VisionConfig(**meta["vision_config"]), Blip2QFormerConfig(**meta["qformer_config"]),
                           llama_dir, meta["num_query_tokens"])
        with safe_open(bridge, "pt") as f:
            check_bridge_shapes(model, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, bridge)
            state = {k: f.get_tensor(k) for k in f.keys()}
        model = fill_model(model, load_llama(llama_dir, dtype), state, device, dtype)
        return cls(model, load_tokenizer(llama_dir), load_image_processor(os.path.join(path, "image_processor")),
                   name=name, vision_fp16_autocast=meta.get("vision_fp16_autocast"))
