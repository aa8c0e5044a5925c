"""The decoder stack of a causal LM, with explicit entry and exit points.

`DecoderStack` wraps the inner decoder (OPT's `OPTDecoder`, Llama's `LlamaModel`) and the LM
head so that every backbone exposes the same four operations:
- `hidden(...)`: the whole stack, final norm included (the model's own forward, KV cache allowed);
- `layers`: the decoder-layer list, so an editor can hook layer l_e directly;
- `run_from(hidden, ..., start)`: layers start..L-1 and the final norm on a given hidden state
  (training runs layers l_e+1.. on h_le + residual without recomputing layers 0..l_e);
- `lm_head`.
Only the per-layer keyword arguments (attention mask, rotary embeddings) differ by family.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask


class DecoderStack(nn.Module):
    """Common interface over one family of decoder; subclasses fill in the family details."""

    def __init__(self, inner: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.inner = inner
        self.lm_head = lm_head

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.layers

    @property
    def config(self):
        return self.inner.config

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.get_input_embeddings()(ids)  # [b, l, d]

    def hidden(self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False):
        """Run the whole stack (the model's own forward). Returns the final hidden states and cache."""
        kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=use_cache)
        if cache is not None:
            kwargs["cache"] = cache
        out = self.inner(**kwargs)
        return out.last_hidden_state, out.cache

    def run_from(self, hidden, attention_mask, position_ids, start: int) -> torch.Tensor:
        """Layers `start`..L-1 and the final norm applied to `hidden` [b, l, d] (no cache)."""
        layer_kwargs = self._layer_kwargs(hidden, attention_mask, position_ids)
        for layer in self.layers[start:]:
            out = layer(hidden, **layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self._final(hidden)

    def _layer_kwargs(self, hidden, attention_mask, position_ids) -> dict:
        raise NotImplementedError

    def _final(self, hidden):
        raise NotImplementedError


class OPTStack(DecoderStack):
    """OPT (BLIP-2's language model): learned positions added before layer 0, LayerNorm at the end."""

    def _layer_kwargs(self, hidden, attention_mask, position_ids):
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None)
        return dict(attention_mask=mask, position_ids=position_ids, use_cache=False)

    def _final(self, hidden):
        if self.inner.final_layer_norm is not None:
            hidden = self.inner.final_layer_norm(hidden)
        if self.inner.project_out is not None:
            hidden = self.inner.project_out(hidden)
        return hidden


class LlamaStack(DecoderStack):
    """Llama / Vicuna (LLaVA, MiniGPT-4): rotary embeddings per layer, RMSNorm at the end."""

    def _layer_kwargs(self, hidden, attention_mask, position_ids):
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        rotary = self.inner.rotary_emb(hidden, position_ids=position_ids)
        return dict(attention_mask=mask, position_embeddings=rotary, position_ids=position_ids, use_cache=False)

    def _final(self, hidden):
        return self.inner.norm(hidden)


class RotaryStack(DecoderStack):
    """Decoders with rotary embeddings computed once in the inner model (Qwen2 / Qwen2.5-VL / Llama
    text models of `hf_vlm.py`), 1-D positions [b, l] or multimodal ones [b, l, 3] (M-RoPE).

    The batch keeps positions batch-first ([b, l, 3]: temporal, height, width) so that
    `VLLMBatch.rows` slices them like every other per-position field; the inner model wants
    [3, b, l]. Layers of `layer_types` "sliding_attention" get the sliding-window mask.
    """

    def hidden(self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False):
        return super().hidden(inputs_embeds, attention_mask, _to_inner(position_ids), cache, use_cache)

    def run_from(self, hidden, attention_mask, position_ids, start: int, layer_inputs=None,
                 image_mask=None) -> torch.Tensor:
        """Layers `start`..L-1 and the final norm applied to `hidden` [b, l, d] (no cache).

        `layer_inputs` [b, l, k, d] / `image_mask` [b, l] (Qwen3-VL's deepstack): what the model adds
        to the output of layers 0..k-1 at the image positions, after the layer (and its edits) ran.
        """
        if start > 0:
            hidden = _add_layer_input(hidden, start - 1, layer_inputs, image_mask)
        positions = _to_inner(position_ids)  # [b, l] or [3, b, l]
        text_positions = positions if positions.ndim == 2 else None
        masks = {"full_attention": create_causal_mask(config=self.config, inputs_embeds=hidden,
                                                      attention_mask=attention_mask, cache=None,
                                                      position_ids=text_positions)}
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * len(self.layers)
        if "sliding_attention" in layer_types:
            from transformers.masking_utils import create_sliding_window_causal_mask

            masks["sliding_attention"] = create_sliding_window_causal_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                position_ids=text_positions)
        rotary = self.inner.rotary_emb(hidden, positions)
        for i in range(start, len(self.layers)):
            out = self.layers[i](hidden, attention_mask=masks[layer_types[i]], position_embeddings=rotary,
                                 position_ids=text_positions, use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = _add_layer_input(hidden, i, layer_inputs, image_mask)
        return self.inner.norm(hidden)


class DeepstackStack(RotaryStack):
    """Qwen3-VL: M-RoPE, plus image features of the vision tower's middle layers added to the output
    of the first k decoder layers at the image positions (the model's own forward does it here)."""

    def hidden(self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False, layer_inputs=None,
               image_mask=None):
        kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=_to_inner(position_ids), use_cache=use_cache)
        if cache is not None:
            kwargs["cache"] = cache
        if layer_inputs is not None:  # [b, l, k, d] -> k tensors [n_image_positions, d], as the model takes them
            kwargs.update(visual_pos_masks=image_mask,
                          deepstack_visual_embeds=[layer_inputs[:, :, i][image_mask] for i in range(layer_inputs.shape[2])])
        out = self.inner(**kwargs)
        return out.last_hidden_state, out.cache


def _add_layer_input(hidden, layer: int, layer_inputs, image_mask):
    """hidden [b, l, d] plus layer_inputs[:, :, layer] at the image positions (unchanged past the k-th layer)."""
    if layer_inputs is None or layer >= layer_inputs.shape[2]:
        return hidden
    hidden = hidden.clone()
    hidden[image_mask] = hidden[image_mask] + layer_inputs[:, :, layer][image_mask]  # [n, d], the model's op
    return hidden


def _to_inner(position_ids: torch.Tensor) -> torch.Tensor:
    """Batch positions -> the inner model's: [b, l] unchanged, [b, l, 3] -> [3, b, l]."""
    return position_ids.permute(2, 0, 1) if position_ids.ndim == 3 else position_ids


def stack_for(inner: nn.Module, lm_head: nn.Module) -> DecoderStack:
    """Pick the stack class from the inner model's config (`opt` or `llama`)."""
    families = {"opt": OPTStack, "llama": LlamaStack, "qwen2_5_vl_text": RotaryStack, "qwen2": RotaryStack,
                "qwen3_vl_text": DeepstackStack}
    model_type = inner.config.model_type
    if model_type not in families:
        raise ValueError(f"unsupported language model type {model_type!r}; supported: {sorted(families)}")
    return families[model_type](inner, lm_head)
