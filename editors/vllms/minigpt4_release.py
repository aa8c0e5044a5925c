"""Load MiniGPT-4 from its original release files by renaming state-dict keys.

The folder holds `model_config.yaml` (the paper repo's layout, spec §3.8) whose paths are relative
to the folder:
    llama_model: vicuna-7b/                 # an HF Llama folder with tokenizer
    vit_path: eva_vit_g.pth                 # EVA ViT-g/14 weights (keys `blocks.N.attn.qkv.weight`, ...)
    q_former_model: blip2_pretrained_flant5xxl.pth   # BLIP-2 checkpoint {'model': {...}}
    ckpt: pretrained_minigpt4.pth           # {'model': {'llama_proj.weight', 'llama_proj.bias'}}
    num_query_token: 32                     # optional
    vision_config: {...}, qformer_config: {...}   # optional overrides of the EVA / BERT-base shapes
    vision_fp16_autocast: null              # optional: images under fp16 autocast (null = on CUDA only)
and optionally `processor_config.yaml` (`image_size`, `mean`, `std`).
Checkpoints are read with `torch.load(weights_only=True, mmap=True)`: no pickled code runs, and
their keys and shapes are checked before Vicuna is read; tensors are cast to the chosen dtype as
they are read. Loading order is the original's: ViT, then the Q-Former checkpoint (which also
carries ViT and ln_vision), then the projection. Keys of parts MiniGPT-4 removed (Q-Former text
branch, word embeddings, BLIP-2 heads) are dropped; any other key that does not map is an error.
"""
from __future__ import annotations

import os
import re

import torch
import yaml
from PIL import Image
from transformers import BlipImageProcessorPil, Blip2QFormerConfig, Blip2VisionConfig

from utils.errors import UserError
from .weight_files import read_torch_state

# EVA ViT-g/14 and the BLIP-2 Q-Former (BERT-base with cross-attention every 2nd layer).
EVA_VIT_G = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
QFORMER_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    cross_attention_frequency=2, layer_norm_eps=1e-12)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

_VIT_RULES = [
    (r"cls_token$", "embeddings.class_embedding"),
    (r"pos_embed$", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight$", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"encoder.layers.\1.mlp.\2.\3"),
]
_QFORMER_RULES = [
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$", r"Qformer.layernorm.\1"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)$",
     r"Qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)$",
     r"Qformer.encoder.layer.\1.\2.output.\3.\4"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.(weight|bias)$",
     r"Qformer.encoder.layer.\1.intermediate_query.dense.\2"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.output_query\.(dense|LayerNorm)\.(weight|bias)$",
     r"Qformer.encoder.layer.\1.output_query.\2.\3"),
    (r"ln_vision\.(weight|bias)$", r"visual_encoder.post_layernorm.\1"),
    (r"query_tokens$", "query_tokens"),
    (r"llama_proj\.(weight|bias)$", r"llama_proj.\1"),
]
# Parts of the released checkpoints that MiniGPT-4 does not use.
_DROPPED = re.compile(r"^(Qformer\.cls\.|Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)"
                      r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|vision_proj|text_proj|itm_head"
                      r"|temp$|t5_proj|opt_proj|llm_proj|(visual_encoder\.)?(norm|fc_norm|head)\.)")


def _apply(rules, key: str) -> str | None:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _rename_vit(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(renamed keys, keys under `prefix` that neither map nor belong to a removed part)."""
    out, biases, unknown = {}, {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        short = key[len(prefix):]
        bias = re.match(r"blocks\.(\d+)\.attn\.(q|v)_bias$", short)
        if bias:
            biases.setdefault(bias.group(1), {})[bias.group(2)] = value
            continue
        new = _apply(_VIT_RULES, short)
        if new is not None:
            out["visual_encoder." + new] = value
        elif not _DROPPED.match(key):
            unknown.append(key)
    for layer, qv in biases.items():
        if set(qv) != {"q", "v"}:
            unknown.extend(f"{prefix}blocks.{layer}.attn.{b}_bias" for b in qv)  # a q bias without v or vice versa
            continue
        out[f"visual_encoder.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat(
            [qv["q"], torch.zeros_like(qv["q"]), qv["v"]])
    return out, unknown


def _unknown_keys_error(source: str, unknown: list[str]) -> UserError:
    return UserError(f"{source}: {len(unknown)} keys do not map onto MiniGPT-4, e.g. {unknown[:5]}; "
                     f"is this the right checkpoint?")


def rename_vit_keys(state: dict[str, torch.Tensor], prefix: str = "",
                    source: str = "ViT checkpoint") -> dict[str, torch.Tensor]:
    """EVA ViT-g keys (optionally under `prefix`, e.g. `visual_encoder.`) -> our `visual_encoder.*` keys.

    EVA has separate q and v biases and no k bias; `Blip2VisionModel` has one qkv bias = [q, 0, v].
    Keys outside `prefix` are ignored; an unknown key inside it raises UserError.
    """
    out, unknown = _rename_vit(state, prefix)
    if unknown:
        raise _unknown_keys_error(source, unknown)
    return out


def rename_release_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keys of a BLIP-2 / MiniGPT-4 checkpoint -> our module's keys; unknown keys raise UserError."""
    out, unknown = _rename_vit(state, prefix="visual_encoder.")
    for key, value in state.items():
        if key.startswith("visual_encoder."):
            continue  # renamed (or reported) by _rename_vit
        new = _apply(_QFORMER_RULES, key)
        if new is not None:
            out[new] = value
        elif not _DROPPED.match(key):
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error(source, unknown)
    return out


def load_release(path: str, device="cpu", dtype=None, name="minigpt-4-vicuna-7b"):
    """Build MiniGPT-4 from the original release files listed in `path/model_config.yaml`."""
    from .hf_parts import load_tokenizer
    from .minigpt4 import MiniGPT4, check_bridge_shapes, check_llama_folder, fill_model, load_llama, meta_model

    with open(os.path.join(path, "model_config.yaml")) as f:
        cfg = yaml.safe_load(f) or {}
    missing_keys = [k for k in ("llama_model", "vit_path", "q_former_model", "ckpt") if k not in cfg]
    if missing_keys:
        raise UserError(f"{path}/model_config.yaml lacks {missing_keys}")
    at = lambda key: os.path.join(path, str(cfg[key]))  # noqa: E731
    # Check every file before loading anything: Vicuna-7B alone takes minutes to load.
    if not os.path.isdir(at("llama_model")):
        raise UserError(f"MiniGPT-4 release: the Vicuna folder (llama_model) not found: {at('llama_model')}")
    for key in ("vit_path", "q_former_model", "ckpt"):
        if not os.path.isfile(at(key)):
            raise UserError(f"MiniGPT-4 release file not found ({key} in model_config.yaml): {at(key)}")
    vision_config = Blip2VisionConfig(**{**EVA_VIT_G, **cfg.get("vision_config", {})})
    # The Q-Former cross-attends to the vision tower, whatever width an override gives it.
    qformer_config = Blip2QFormerConfig(**{**QFORMER_BASE, "encoder_hidden_size": vision_config.hidden_size,
                                           **cfg.get("qformer_config", {})})
    check_llama_folder(at("llama_model"))
    model = meta_model(vision_config, qformer_config, at("llama_model"), int(cfg.get("num_query_token", 32)))
    state = rename_vit_keys(read_torch_state(at("vit_path")), source=cfg["vit_path"])
    state.update(rename_release_keys(read_torch_state(at("q_former_model")), cfg["q_former_model"]))
    state.update(rename_release_keys(read_torch_state(at("ckpt")), cfg["ckpt"]))
    check_bridge_shapes(model, {k: tuple(v.shape) for k, v in state.items()}, f"the MiniGPT-4 release in {path}")
    dtype = dtype or torch.float32
    model = fill_model(model, load_llama(at("llama_model"), dtype), state, device, dtype)
    return MiniGPT4(model, load_tokenizer(at("llama_model")), _release_image_processor(path), name=name,
                    vision_fp16_autocast=cfg.get("vision_fp16_autocast"))


def _release_image_processor(path: str) -> BlipImageProcessorPil:
    cfg = {}
    proc_path = os.path.join(path, "processor_config.yaml")
    if os.path.isfile(proc_path):
        with open(proc_path) as f:
            cfg = yaml.safe_load(f) or {}
    size = int(cfg.get("image_size", 224))
    return BlipImageProcessorPil(size={"height": size, "width": size}, resample=Image.BICUBIC,
                              image_mean=cfg.get("mean", CLIP_MEAN), image_std=cfg.get("std", CLIP_STD),
                              do_convert_rgb=True)
