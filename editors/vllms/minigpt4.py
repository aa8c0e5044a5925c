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
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (AutoImageProcessor, AutoTokenizer, Blip2QFormerConfig, Blip2QFormerModel,
                          Blip2VisionConfig, Blip2VisionModel, LlamaForCausalLM)

from utils.errors import UserError
from .base import VLLM
from .stack import stack_for


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


class MiniGPT4(VLLM):
    family = "minigpt4"
    image_after_bos = True
    image_text_prefix = "\n"
    image_placeholder = "<ImageHere>"

    def __init__(self, model: MiniGPT4Model, tokenizer, image_processor, name="minigpt-4-vicuna-7b"):
        lm = model.llama_model
        super().__init__(model, stack_for(lm.model, lm.lm_head), tokenizer, image_processor,
                         model.query_tokens.shape[1], name)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixel_values)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        meta = {"format": "liveedit-minigpt4", "num_query_tokens": self.num_image_tokens,
                "vision_config": self.model.visual_encoder.config.to_dict(),
                "qformer_config": self.model.Qformer.config.to_dict()}
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
        llama = LlamaForCausalLM.from_pretrained(os.path.join(path, "llama"), dtype=dtype or torch.float32)
        model = MiniGPT4Model(Blip2VisionConfig(**meta["vision_config"]),
                              Blip2QFormerConfig(**meta["qformer_config"]), llama, meta["num_query_tokens"])
        missing, unexpected = model.load_state_dict(load_file(os.path.join(path, "bridge.safetensors")),
                                                    strict=False)
        missing = [k for k in missing if not k.startswith("llama_model.")]
        if missing or unexpected:
            raise UserError(f"{path}/bridge.safetensors does not fit MiniGPT-4: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
        model.to(device=device, dtype=dtype or torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(os.path.join(path, "llama")),
                   AutoImageProcessor.from_pretrained(os.path.join(path, "image_processor")), name=name)
