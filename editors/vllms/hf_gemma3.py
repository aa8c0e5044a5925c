"""Gemma 3 (`gemma3`, `Gemma3ForConditionalGeneration`) as an `HFVLM`.

SigLIP sees the image at one fixed size; the projector average-pools its patches to a fixed
`mm_tokens_per_image` soft tokens (256 on the real models) and projects them into the LM. The
processor expands the `<start_of_image>` placeholder into
    "\\n\\n<start_of_image>" + "<image_soft_token>" x 256 + "<end_of_image>\\n\\n".
Layout of one row (chat mode; Gemma's template, BOS once):
    [<bos><start_of_turn>user\\n\\n\\n<start_of_image>][<image_soft_token> x 256][<end_of_image>\\n\\nprompt
     <end_of_turn>\\n<start_of_turn>model\\n][target][pad]
The vision span is the soft-token run.

Attention: the LM is causal over text but bidirectional inside an image: transformers' forward turns
the processor's `token_type_ids` (1 on soft tokens) into block ids (one block per image run) and
builds each layer type's mask as causal OR same-block (full-attention layers) and, on the
sliding-window layers, AND the window. `prepare` stores the block ids in `VLLMBatch.image_blocks`
and `Gemma3Stack` builds the same masks with transformers' own function for every whole-sequence
pass, `hidden_at_layer`, `run_from` and the prefill of `generate`; decoding steps are causal (what
transformers' generation does after the first step). Rotary embeddings differ by layer type (local /
global base frequency); the word embedding multiplies by sqrt(hidden size) (the inner model's own
embedding module, so `embed_tokens` includes it).
"""
from __future__ import annotations

import os

import torch

from utils.errors import UserError
from .hf_vlm import HFVLM
from .stack import DecoderStack


class Gemma3Stack(DecoderStack):
    """Gemma 3's text decoder: per-layer-type rotary embeddings and masks, image blocks attended both ways."""

    def _masks(self, inputs_embeds, attention_mask, position_ids, cache, image_blocks) -> dict:
        """{layer type: mask} as `Gemma3Model.forward` builds them from `token_type_ids`."""
        from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model

        return create_masks_for_vision_model(config=self.config, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask, cache=cache, position_ids=position_ids,
                                             block_sequence_ids=image_blocks)

    def hidden(self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False, image_blocks=None):
        """The inner model's forward; with `image_blocks` [b, l] the masks are the image-aware ones
        (the inner model accepts a ready {layer type: mask}); without, it builds the causal ones itself."""
        if image_blocks is not None:
            attention_mask = self._masks(inputs_embeds, attention_mask, position_ids, cache, image_blocks)
        return super().hidden(inputs_embeds, attention_mask, position_ids, cache, use_cache)

    def run_from(self, hidden, attention_mask, position_ids, start: int, image_blocks=None) -> torch.Tensor:
        """Layers `start`..L-1 and the final norm on `hidden` [b, l, d] (no cache), masks as in `hidden`."""
        if image_blocks is None:
            image_blocks = torch.full_like(position_ids, -1)  # [b, l] no image: causal (and the window)
        masks = self._masks(hidden, attention_mask, position_ids, None, image_blocks)
        types = self.config.layer_types
        rotary = {t: self.inner.rotary_emb(hidden, position_ids, t) for t in set(types)}
        for i in range(start, len(self.layers)):
            hidden = self.layers[i](hidden, attention_mask=masks[types[i]], position_embeddings=rotary[types[i]],
                                    position_ids=position_ids, use_cache=False)
        return self.inner.norm(hidden)


def _classes():
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

    return Gemma3ForConditionalGeneration, Gemma3Processor  # no video processor to drop


class Gemma3(HFVLM):
    """Gemma 3 (-it releases): SigLIP, 256 pooled soft tokens per image, Gemma 3 LM (5 local : 1 global layers)."""

    hf_class, processor_class = _classes()
    model_type = "gemma3"
    family = "gemma3"
    default_name = "gemma3-4b"
    image_text = "<start_of_image>"
    stack_class = Gemma3Stack

    def __init__(self, model, processor, name: str, prompt_mode: str = "chat"):
        super().__init__(model, processor, name, prompt_mode)
        # the processor's `image_token_id` is the placeholder's (<start_of_image>); the positions the
        # features go to hold the soft token
        self.image_token_id = int(processor.tokenizer.image_token_id)

    @staticmethod
    def max_image_tokens(processor) -> int:
        """Fixed: every image is `image_seq_length` soft tokens (pan-and-scan crops stay off)."""
        return int(processor.image_seq_length)

    @classmethod
    def from_directory(cls, path: str, **kwargs) -> "Gemma3":
        """`HFVLM.from_directory`, then the processor's soft tokens per image checked against the model's."""
        vllm = super().from_directory(path, **kwargs)
        said, made = vllm.processor.image_seq_length, vllm.model.config.mm_tokens_per_image
        if said != made:
            raise UserError(f"{os.path.join(path, 'processor_config.json')}: image_seq_length is {said} but the model "
                            f"in {path} makes {made} tokens per image (mm_tokens_per_image in config.json); copy "
                            f"processor_config.json from the original model folder")
        return vllm

    @property
    def prototype_tokens(self) -> int:
        """LiveEdit's prototype length: the fixed soft-token count, as on the paper's backbones."""
        return self.num_image_tokens

    def prompt_text(self, prompt: str, with_image: bool) -> str:
        """The template's text without its leading BOS when the tokenizer adds BOS itself (Gemma's
        template writes `{{ bos_token }}` and its tokenizer adds one too: once, as in
        `apply_chat_template(tokenize=True)`)."""
        text = super().prompt_text(prompt, with_image)
        bos = self.tokenizer.bos_token
        if self.prompt_mode == "chat" and bos and text.startswith(bos) and self._adds_bos():
            text = text[len(bos):]
        return text

    def _adds_bos(self) -> bool:
        return self.tokenizer("x")["input_ids"][:1] == [self.tokenizer.bos_token_id]

    def prepare(self, prompts, images=None, targets=None, padding_side: str = "right"):
        """`HFVLM.prepare`, plus the image blocks of the bidirectional attention ([b, l], -1 off images)."""
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

        batch = super().prepare(prompts, images, targets, padding_side)
        image = (batch.token_ids < 0) & batch.attention_mask.bool()  # [b, l] the soft tokens
        batch.image_blocks = get_block_sequence_ids_for_mask(image.long(), device=self.device)
        return batch
