"""Any transformers image-text-to-text model that has a processor (Qwen2.5-VL first), as a `VLLM`.

Inputs are built by the model's own processor: it resizes each image (dynamic resolution), says how
many vision tokens the image becomes, and expands the image placeholder of the text into that many
image tokens. The adapter then embeds the ids and puts the image features where the image tokens
are (what the model's own forward does), so the LM sees exactly what plain transformers feeds it.

Layout of one row (chat mode, the default; Qwen2.5-VL's template shown):
    [<|im_start|>user\\n<|vision_start|>][<|image_pad|> x n][<|vision_end|>prompt<|im_end|>\\n
     <|im_start|>assistant\\n][target][pad]
raw mode (the paper's, no template): [image text][prompt][" " target][pad].
n varies with the image's size. The vision span a LiveEdit-style editor reads is the block from the
first to the last image token of the row: one run for Qwen; for a family that splits an image
into tiles with text between them, the tiles' runs and the text between them. A row holds at most
one image (a `Sample` has one); several images are several rows, encoded in one call.

Positions: with multimodal rotary embeddings (Qwen's M-RoPE) each row's positions come from the
model's `get_rope_index` and are kept as [b, l, 3] in the batch (0 on padding); the stack hands
them to the LM as [3, b, l] for the whole pass, for `hidden_at_layer`, `logits_from_layer` and
every decoding step (the next token's position is the last one + 1 in all three components).

`num_image_tokens` is the most tokens one image can become (the processor's largest image): the
length budget of a record. `prototype_tokens` is the fixed length LiveEdit gives its learned visual
prototype on these backbones.
"""
from __future__ import annotations

import inspect
import os
from typing import Sequence

import torch

from utils.errors import UserError
from .base import VLLM
from .load_report import AllowList, check_hf_loading_info
from .stack import stack_for
from .weight_files import hf_weight_files

PROMPT_MODES = ("chat", "raw")
RAW_SUFFIX = ":raw"  # a backbone name ending in it builds prompts without the chat template


def image_only(processor_cls: type) -> type:
    """`processor_cls` without its video processor (transformers' video processors need
    torchvision, which the project never needs): same calls, same files, images and text only.
    The class's own __init__ stays, so its settings (LLaVA-OneVision's num_image_tokens...) are saved
    and read back by save_pretrained / from_pretrained; only the video processor is no attribute."""
    def get_attributes(cls):
        return [a for a in processor_cls.get_attributes.__func__(cls) if a != "video_processor"]

    return type(processor_cls.__name__, (processor_cls,), {"get_attributes": classmethod(get_attributes),
                                                           "__module__": __name__})


class HFVLM(VLLM):
    """A processor-driven transformers VLM; subclasses name the classes and the image text."""

    family = "hf_vlm"
    hf_class: type = None          # e.g. Qwen2_5_VLForConditionalGeneration
    processor_class: type = None   # the image-only processor class (see `image_only`)
    model_type: str = ""           # config.json's model_type
    image_text: str = ""           # what stands for one image in raw mode (the template's image text)
    default_name: str = ""
    # a tied LM head may be absent from the files (tie_word_embeddings); nothing unexpected is allowed
    allowed_keys = AllowList(unexpected=(), tied=(r"(^|\.)lm_head\.weight$",))
    max_prototype_tokens = 64      # LiveEdit prototype length cap (see `prototype_tokens`)
    stack_class: type | None = None  # the LM's DecoderStack when `stack_for` does not pick it (Gemma 3)

    def __init__(self, model, processor, name: str, prompt_mode: str = "chat"):
        if prompt_mode not in PROMPT_MODES:
            raise UserError(f"prompt mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        inner, lm_head = self.language_model(model)
        super().__init__(model, (self.stack_class or stack_for)(inner, lm_head), processor.tokenizer, processor.image_processor,
                         self.max_image_tokens(processor), name)
        self.processor = processor
        self.prompt_mode = prompt_mode
        self.image_token_id = int(processor.image_token_id)
        self.image_placeholder = processor.image_token
        self._feature_args = set(inspect.signature(model.model.get_image_features).parameters)
        self._rope_index = getattr(model.model, "get_rope_index", None)  # M-RoPE families only

    # ---- family details (subclasses) ------------------------------------------------------------
    @staticmethod
    def language_model(model):
        """(inner decoder, lm_head) of the transformers model."""
        return model.model.language_model, model.lm_head

    @staticmethod
    def max_image_tokens(processor) -> int:
        raise NotImplementedError

    @property
    def prototype_tokens(self) -> int:
        """LiveEdit's prototype length here: the image-token budget, capped (a real model's budget
        is thousands of tokens)."""
        return min(self.num_image_tokens, self.max_prototype_tokens)

    # ---- inputs ---------------------------------------------------------------------------------
    def prompt_text(self, prompt: str, with_image: bool) -> str:
        """The text before the target: the chat template's user turn and assistant header, or raw."""
        if self.image_placeholder in prompt:
            raise UserError(f"prompt contains the image placeholder {self.image_placeholder!r}; pass the "
                            f"image separately, the backbone inserts it: {prompt!r}")
        if self.prompt_mode == "raw":
            return (self.image_text if with_image else "") + prompt
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def _row(self, prompt: str, target: str, image):
        """One row through the processor: (ids [n], target start, processor outputs of the image)."""
        head = self.prompt_text(prompt, image is not None)
        sep = ""
        if self.prompt_mode == "raw" and target and prompt and not prompt[-1].isspace() and not target[0].isspace():
            sep = " "  # the paper's rule (base.py `_tokenize`)
        images = None
        if image is not None:
            from utils.images import load_image

            images = [load_image(image) if isinstance(image, str) else image.convert("RGB")]
        enc = self.processor(text=[head + sep + target], images=images, return_tensors="pt",
                             return_offsets_mapping=True)
        ids = enc["input_ids"][0]  # [n]
        offsets = enc["offset_mapping"][0].tolist()
        t_start = len(ids)
        if target:  # the target ends the (expanded) text: its first token ends after that boundary
            boundary = max(e for _, e in offsets) - len(target)
            t_start = next(i for i, (s, e) in enumerate(offsets) if e > boundary and e > s)
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "offset_mapping")}
        return ids, t_start, extra

    def encode_images(self, image_inputs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Processor outputs of several images -> per image [n_i, d] features in the LM's input space,
        and per image [n_i, k, d] features for the first k decoder layers (Qwen3-VL's deepstack; else None)."""
        kwargs = {k: (v.to(self.device, self.dtype) if k == "pixel_values" else v.to(self.device))
                  for k, v in image_inputs.items() if k in self._feature_args and torch.is_tensor(v)}
        out = self.model.model.get_image_features(**kwargs, return_dict=True)
        parts = _per_image(out.pooler_output)
        deep = getattr(out, "deepstack_features", None)  # k levels, each per image
        if not deep:
            return parts, None
        levels = [_per_image(level) for level in deep]  # k x n_images x [n_i, d]
        return parts, [torch.stack([level[i] for level in levels], dim=1) for i in range(len(parts))]

    def prepare(self, prompts: Sequence[str], images: Sequence | None = None,
                targets: Sequence[str] | None = None, padding_side: str = "right"):
        b = len(prompts)
        images = list(images) if images is not None else [None] * b
        targets = list(targets) if targets is not None else [""] * b
        if not (len(images) == len(targets) == b):
            raise ValueError(f"got {b} prompts, {len(images)} images, {len(targets)} targets")
        rows = [self._row(p, t, im) for p, t, im in zip(prompts, targets, images)]
        with_image = [im is not None for im in images]
        features, deep = self._features([extra for (_, _, extra), has in zip(rows, with_image) if has])
        features, deep = iter(features), iter(deep) if deep is not None else None
        built, positions, layer_inputs = [], [], []
        for (ids, t_start, extra), has_img in zip(rows, with_image):
            ids = ids.to(self.device)
            is_image = ids == self.image_token_id  # [n]
            embeds = self.stack.embed_tokens(ids)  # [n, d]
            vision, row_layer = (0, 0), None
            if has_img:
                feat = next(features)  # [n_img, d]
                if int(is_image.sum()) != len(feat):
                    raise RuntimeError(f"{self.name}: {int(is_image.sum())} image tokens but {len(feat)} features")
                embeds = embeds.masked_scatter(is_image[:, None], feat.to(embeds.dtype))
                if deep is not None:  # [n_img, k, d] -> [n, k, d], 0 outside the image
                    row_deep = next(deep)
                    row_layer = embeds.new_zeros(len(ids), *row_deep.shape[1:]).index_put(
                        (is_image.nonzero().flatten(),), row_deep.to(embeds.dtype))
                where = is_image.nonzero().flatten()
                vision = (int(where[0]), int(where[-1]) + 1)
            elif bool(is_image.any()):
                raise UserError(f"{self.name}: a text-only row holds image tokens")
            layer_inputs.append(row_layer)
            positions.append(self._positions(ids, extra))
            built.append((embeds, ids.masked_fill(is_image, -1), vision, t_start))
        batch = self._pad(built, with_image, padding_side)
        if positions[0].ndim == 2:  # M-RoPE: [n, 3] per row -> [b, l, 3], 0 on padding
            pos = torch.zeros(b, batch.length, 3, dtype=torch.long, device=self.device)
            for i, p in enumerate(positions):
                pos[i, batch.attention_mask[i].bool()] = p
            batch.position_ids = pos
        shapes = [t.shape[1:] for t in layer_inputs if t is not None]
        if shapes:  # Qwen3-VL: [b, l, k, d], 0 on text, padding and text-only rows
            dense = batch.inputs_embeds.new_zeros(b, batch.length, *shapes[0])
            for i, t in enumerate(layer_inputs):
                if t is not None:
                    dense[i, batch.attention_mask[i].bool()] = t
            batch.vision_layer_inputs = dense
        return batch

    def _features(self, extras: list[dict]):
        """Image features of the image rows, one encoder call for all of them (see `encode_images`)."""
        if not extras:
            return [], None
        joined = {k: torch.cat([e[k] for e in extras]) for k in extras[0]
                  if torch.is_tensor(extras[0][k]) and k in self._feature_args}
        return self.encode_images(joined)

    def _positions(self, ids: torch.Tensor, extra: dict) -> torch.Tensor:
        """Positions of one unpadded row: [n] (1-D rotary) or [n, 3] (the model's `get_rope_index`)."""
        n = len(ids)
        if self._rope_index is None:
            return torch.arange(n, device=self.device)
        types = (ids == self.image_token_id).int()[None]  # [1, n] 1 on image tokens (mm_token_type_ids)
        grid = extra.get("image_grid_thw")
        pos, _ = self._rope_index(ids[None], mm_token_type_ids=types,
                                  image_grid_thw=grid.to(self.device) if grid is not None else None)
        return pos[:, 0].T.contiguous()  # [n, 3]

    def pixel_values(self, images):
        raise NotImplementedError(f"{self.name}: images go through the processor with their text (`prepare`)")

    # ---- files ----------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    @classmethod
    def from_directory(cls, path: str, device="cpu", dtype=None, name: str | None = None,
                       prompt_mode: str = "chat") -> "HFVLM":
        """The folder's processor and weights (read in `dtype`, default float32), checked like HF folders."""
        from .hf_parts import check_tokenizer_files

        check_tokenizer_files(path)
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("processor_config.json", "preprocessor_config.json")):
            raise UserError(f"no processor_config.json or preprocessor_config.json in {path}: the image "
                            f"preprocessing settings are missing; copy them from the original model folder")
        hf_weight_files(path)
        try:
            processor = cls.processor_class.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the processor in {path}: {str(exc).splitlines()[0]}") from exc
        model, info = cls.hf_class.from_pretrained(path, dtype=dtype or torch.float32, output_loading_info=True,
                                                   ignore_mismatched_sizes=True)
        check_hf_loading_info(path, cls.allowed_keys, info, tied=model.config.get_text_config().tie_word_embeddings)
        return cls(model.to(device), processor, name=name or cls.default_name, prompt_mode=prompt_mode)


def _per_image(out) -> list[torch.Tensor]:
    """A feature output (a tuple per image, or a [n, tokens, d] tensor) -> per image [tokens, d]."""
    parts = list(out) if isinstance(out, (list, tuple)) else list(out.unbind(0))
    return [p.reshape(-1, p.shape[-1]) for p in parts]


def _qwen_classes():
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    return Qwen2_5_VLForConditionalGeneration, image_only(Qwen2_5_VLProcessor)


class Qwen25VL(HFVLM):
    """Qwen2.5-VL: dynamic-resolution ViT, 2x2 patch merger, Qwen2 LM with M-RoPE."""

    hf_class, processor_class = _qwen_classes()
    model_type = "qwen2_5_vl"
    family = "qwen2.5-vl"
    default_name = "qwen2.5-vl-7b"
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"

    @staticmethod
    def max_image_tokens(processor) -> int:
        ip = processor.image_processor  # size.longest_edge: the most pixels an image is resized to
        longest = getattr(ip.size, "longest_edge", None) or getattr(ip.size, "max_pixels", None) or ip.max_pixels
        return int(longest) // (ip.patch_size * ip.merge_size) ** 2


def _qwen3_classes():
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    return Qwen3VLForConditionalGeneration, image_only(Qwen3VLProcessor)


class Qwen3VL(Qwen25VL):
    """Qwen3-VL: Qwen2.5-VL's input format; the vision tower's middle layers also feed the first k
    decoder layers at the image positions (deepstack: `VLLMBatch.vision_layer_inputs`)."""

    hf_class, processor_class = _qwen3_classes()
    model_type = "qwen3_vl"
    family = "qwen3-vl"
    default_name = "qwen3-vl-8b"
