"""`VLLMBatch`: what a backbone hands to the language model for a batch of (prompt, image, target).

Every span is per sample, as `[start, end)` positions in the padded sequence, so any batch size,
mixed prompt lengths, mixed image / text-only rows and either padding side work the same way.
Labels are built from the same token ids that produced the embeddings (no second tokenisation):
`labels[b, t]` is the token at position t+1 for every position t that predicts a target token,
and `label_mask[b, t]` marks those positions.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class VLLMBatch:
    inputs_embeds: torch.Tensor   # [b, l, d] LM input (image features spliced in)
    attention_mask: torch.Tensor  # [b, l] long, 0 on padding
    position_ids: torch.Tensor    # [b, l] long, cumsum(mask) - 1 (0 on padding)
    token_ids: torch.Tensor       # [b, l] long, text token ids; -1 on image positions and padding
    vision_spans: torch.Tensor    # [b, 2] long, image positions; [0, 0] for text-only rows
    query_spans: torch.Tensor     # [b, 2] long, after the image up to the last prompt token inclusive
    target_spans: torch.Tensor    # [b, 2] long, the target tokens; empty when there is no target
    labels: torch.Tensor          # [b, l] long, next-token id where label_mask, else 0
    label_mask: torch.Tensor      # [b, l] bool, positions whose prediction is a target token
    has_image: torch.Tensor       # [b] bool
    vision_layer_inputs: torch.Tensor | None = None  # [b, l, k, d]: added to the output of decoder layers
                                  # 0..k-1 at the image positions (Qwen3-VL's deepstack features; 0 elsewhere);
                                  # None for every other family
    image_blocks: torch.Tensor | None = None  # [b, l] long: which image of the row (0, 1, ..) each image position
                                  # belongs to, -1 elsewhere; set where the LM attends bidirectionally inside
                                  # an image (Gemma 3), None for causal-only families

    @property
    def size(self) -> int:
        return self.inputs_embeds.shape[0]

    @property
    def length(self) -> int:
        return self.inputs_embeds.shape[1]

    def to(self, device) -> "VLLMBatch":
        return VLLMBatch(**{f.name: _map(getattr(self, f.name), lambda t: t.to(device)) for f in fields(self)})

    def rows(self, start: int, end: int) -> "VLLMBatch":
        """Rows start..end-1 as a batch; trailing columns that are padding in all of them are dropped."""
        mask = self.attention_mask[start:end]  # [n, l]
        length = int(mask.any(0).nonzero().max()) + 1 if mask.any() else self.length
        per_position = ("inputs_embeds", "attention_mask", "position_ids", "token_ids", "labels", "label_mask",
                        "vision_layer_inputs", "image_blocks")
        return VLLMBatch(**{f.name: _map(getattr(self, f.name), (lambda t: t[start:end, :length]) if f.name in per_position
                                         else (lambda t: t[start:end])) for f in fields(self)})

    def layer_inputs(self) -> dict:
        """Keyword arguments of `DecoderStack.hidden` / `run_from` for what the layers add: none for most
        families; the per-layer image features and the image positions [b, l] bool for Qwen3-VL; the image
        blocks of the bidirectional attention for Gemma 3."""
        if self.image_blocks is not None:
            return {"image_blocks": self.image_blocks}
        if self.vision_layer_inputs is None:
            return {}
        return {"layer_inputs": self.vision_layer_inputs,
                "image_mask": (self.token_ids < 0) & self.attention_mask.bool()}


def _map(value, fn):
    return None if value is None else fn(value)


def with_prefix(batch: VLLMBatch, prefixes, padding_side: str = "right") -> VLLMBatch:
    """`batch` with `prefixes[i]` ([p_i, d] embeddings, or None for none) put before row i's tokens.

    The prefix goes in front of everything the row holds (its image and BOS too); spans, labels and
    label positions move with the row, so scoring still reads the target's logits, and the prefix
    positions carry no label (token id -1, outside every span). The result is padded on
    `padding_side` like the input. Differentiable in the prefix embeddings (continuous prompts train
    through it).
    """
    lens = [0 if p is None else int(p.shape[0]) for p in prefixes]
    if len(lens) != batch.size:
        raise ValueError(f"{len(lens)} prefixes for a batch of {batch.size} rows")
    if not any(lens):
        return batch
    mask = batch.attention_mask.bool()  # [b, l]
    n_real = mask.sum(1).tolist()
    starts = mask.int().argmax(1).tolist()  # first real position of each row
    length = max(n + p for n, p in zip(n_real, lens))
    dev, dtype = batch.inputs_embeds.device, batch.inputs_embeds.dtype
    d = batch.inputs_embeds.shape[-1]
    embeds, shifts = [], []
    new = {k: torch.zeros(batch.size, length, dtype=getattr(batch, k).dtype, device=dev)
           for k in ("attention_mask", "labels", "label_mask")}
    new["token_ids"] = torch.full((batch.size, length), -1, dtype=torch.long, device=dev)
    blocks = None if batch.image_blocks is None else torch.full_like(new["token_ids"], -1)  # [b, length]
    for i, (n, p, s) in enumerate(zip(n_real, lens, starts)):
        off = 0 if padding_side == "right" else length - n - p
        shift = off + p - s  # old position t of this row -> t + shift
        shifts.append(shift)
        parts = [batch.inputs_embeds[i, s:s + n]]  # [n, d]
        if p:
            parts.insert(0, prefixes[i].to(dev, dtype))  # [p, d]
        pad = batch.inputs_embeds.new_zeros(length - n - p, d)
        embeds.append(torch.cat([pad] + parts if padding_side == "left" else parts + [pad]))
        new["attention_mask"][i, off:off + n + p] = 1
        new["token_ids"][i, off + p:off + p + n] = batch.token_ids[i, s:s + n]
        if blocks is not None:
            blocks[i, off + p:off + p + n] = batch.image_blocks[i, s:s + n]
        new["labels"][i, off + p:off + p + n] = batch.labels[i, s:s + n]
        new["label_mask"][i, off + p:off + p + n] = batch.label_mask[i, s:s + n]
    shift = torch.tensor(shifts, device=dev)[:, None]  # [b, 1]

    def moved(spans):  # [b, 2]; empty spans stay [0, 0] when they were (text-only rows' vision)
        empty = (spans[:, 1] <= spans[:, 0]) & (spans[:, 0] == 0)
        return torch.where(empty[:, None], spans, spans + shift)

    return VLLMBatch(inputs_embeds=torch.stack(embeds), attention_mask=new["attention_mask"],
                     position_ids=position_ids_from_mask(new["attention_mask"]), token_ids=new["token_ids"],
                     vision_spans=moved(batch.vision_spans), query_spans=batch.query_spans + shift,
                     target_spans=batch.target_spans + shift, labels=new["labels"],
                     label_mask=new["label_mask"], has_image=batch.has_image, image_blocks=blocks)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding on either side: 0, 1, 2, ... over the real tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [b, l]
