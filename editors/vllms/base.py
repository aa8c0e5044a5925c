"""The one interface every backbone implements (DESIGN.md §2).

A backbone = vision encoder + bridge (Q-Former / projector) + decoder-only LM. Subclasses provide
`encode_images` (pixels -> [n, image_tokens, d] LM-space features) and `save`; everything else —
input building with per-sample spans and labels, the LM forward, stopping after layer l, running
from layer l+1, greedy generation with a KV cache — is shared here.

Layout of one row (right padding shown):
    BLIP-2:            [image x32][BOS prompt target][pad]
    LLaVA, MiniGPT-4:  [BOS][image xN]["\n" prompt target][pad]
    text-only (all):   [BOS prompt target][pad]
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from utils.errors import UserError
from .batch import VLLMBatch, position_ids_from_mask, with_prefix
from .hooks import EditFn, LayerEdit, LayerHooks, StopForward  # noqa: F401  (StopForward: re-exported)
from .placement import execution_device
from .stack import DecoderStack


class InputPrefix:
    """Handle of one input-prefix function on a backbone: `remove()` detaches it (idempotent)."""

    def __init__(self, vllm: "VLLM", fn):
        self._vllm, self.fn = vllm, fn

    def remove(self) -> None:
        self._vllm._input_prefixes = tuple(h for h in self._vllm._input_prefixes if h is not self)


class VLLM(nn.Module):
    """A frozen vision-language model seen through the editing interface."""

    family: str = ""              # "blip2" | "llava" | "minigpt4"
    image_after_bos: bool = False  # image goes after BOS (LLaVA, MiniGPT-4) or before it (BLIP-2)
    image_text_prefix: str = ""    # text right after the image ("\n" for LLaVA / MiniGPT-4)
    image_placeholder: str | None = None  # the string users must not type into prompts
    source: str | None = None     # real path of the folder the weights came from (None: built in memory)

    def __init__(self, model: nn.Module, stack: DecoderStack, tokenizer, image_processor,
                 num_image_tokens: int, name: str):
        super().__init__()
        self.model = model
        self.stack = stack
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.name = name
        self.hooks = LayerHooks(stack.layers)  # layer edits and the per-thread call they receive
        self._input_prefixes: tuple[InputPrefix, ...] = ()  # editors' prefix functions (see `add_input_prefix`)
        self.model.eval().requires_grad_(False)

    # ---- subclass API -------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] pixels -> [n, num_image_tokens, d] features in the LM's input space."""
        raise NotImplementedError

    def save(self, directory: str) -> None:
        """Write weights, tokenizer and image processor so that `load_vllm(family, directory)` reloads them."""
        raise NotImplementedError

    # ---- properties ---------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        """The LM's decoder layers (edit one through `edit_layer`, not a torch hook)."""
        return self.stack.layers

    @property
    def prototype_tokens(self) -> int:
        """Length of LiveEdit's learned visual prototype on this backbone: its image-token count."""
        return self.num_image_tokens

    @property
    def num_layers(self) -> int:
        return len(self.stack.layers)

    @property
    def hidden_size(self) -> int:
        return self.stack.config.hidden_size

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the one device without a device map);
        logits and final hidden states come back here too."""
        return execution_device(self.stack.inner.get_input_embeddings())

    def device_of_layer(self, layer: int) -> torch.device:
        """Where decoder layer `layer` runs (its output, and an edit of it, live there)."""
        return execution_device(self.layers[layer])

    @property
    def device_map(self) -> dict[str, str] | None:
        """{module name in `model`: device} when the backbone is spread over devices (`--device_map`), else None."""
        return getattr(self.model, "hf_device_map", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.stack.lm_head.weight.dtype

    # ---- inputs -------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence) -> torch.Tensor:
        """PIL images or paths -> [n, 3, H, W] on the model's device and dtype."""
        from utils.images import load_image

        pil = [load_image(im) if isinstance(im, str) else im.convert("RGB") for im in images]
        px = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    def _tokenize(self, prompt: str, target: str, with_image: bool) -> tuple[list[int], int]:
        """Token ids of prompt + target and the index of the first target token.

        One tokenisation of the joint text; the character offsets say where the target starts, so
        labels always match the ids that were embedded. A single space joins prompt and target
        unless either side already has whitespace there (the paper's rule).
        """
        if self.image_placeholder and self.image_placeholder in prompt:
            raise UserError(f"prompt contains the image placeholder {self.image_placeholder!r}; pass the "
                            f"image separately, the backbone inserts it: {prompt!r}")
        prefix = self.image_text_prefix if with_image else ""
        sep = " " if target and prompt and not prompt[-1].isspace() and not target[0].isspace() else ""
        boundary = len(prefix) + len(prompt)
        enc = self.tokenizer(prefix + prompt + sep + target, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        target_start = len(ids)
        if target:
            target_start = next(i for i, (s, e) in enumerate(offsets) if e > boundary and e > s)
        return list(ids), target_start

    def prepare(self, prompts: Sequence[str], images: Sequence | None = None,
                targets: Sequence[str] | None = None, padding_side: str = "right") -> VLLMBatch:
        """Build the LM inputs for a batch of (prompt, image or None, target) triples.

        `images` holds a PIL image, a path or None per row (None = text-only); `targets` may be
        None (prompts only, e.g. for generation). Right padding for teacher forcing, left for
        generation.
        """
        b = len(prompts)
        images = list(images) if images is not None else [None] * b
        targets = list(targets) if targets is not None else [""] * b
        if not (len(images) == len(targets) == b):
            raise ValueError(f"got {b} prompts, {len(images)} images, {len(targets)} targets")
        with_image = [im is not None for im in images]
        features = None
        if any(with_image):
            features = self.encode_images(self.pixel_values([im for im in images if im is not None]))
            if features.shape[1] != self.num_image_tokens:  # guards the 5.x placeholder traps
                raise RuntimeError(f"{self.name}: image encoder gave {features.shape[1]} tokens, "
                                   f"expected {self.num_image_tokens}")
        rows, image_i = [], 0
        bos = self.tokenizer.bos_token_id
        for prompt, target, has_img in zip(prompts, targets, with_image):
            ids, t_start = self._tokenize(prompt, target, has_img)
            ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
            embeds = self.stack.embed_tokens(ids_t)  # [n_tok, d]
            token_ids, vision = ids_t, (0, 0)
            if has_img:
                at = 1 if (self.image_after_bos and ids and ids[0] == bos) else 0
                feat = features[image_i].to(embeds.device, embeds.dtype)  # [n_img, d]
                image_i += 1
                embeds = torch.cat([embeds[:at], feat, embeds[at:]])
                token_ids = torch.cat([ids_t[:at], ids_t.new_full((len(feat),), -1), ids_t[at:]])
                vision = (at, at + len(feat))
                t_start += len(feat)
            rows.append((embeds, token_ids, vision, t_start))
        batch = self._pad(rows, with_image, padding_side)
        if self._input_prefixes and self.hooks.edits_on():
            for handle in self._input_prefixes:
                batch = with_prefix(batch, handle.fn(list(prompts), images), padding_side)
        return batch

    def add_input_prefix(self, fn) -> "InputPrefix":
        """Let an editor put embeddings in front of rows: on every later `prepare` (scoring, generation,
        training batches), `fn(prompts, images)` returns per row a [p, d] tensor or None, and
        `batch.with_prefix` inserts it before the row (spans and labels move with the row). Off inside
        `unedited()`. Returns the handle (`.remove()`)."""
        handle = InputPrefix(self, fn)
        self._input_prefixes = self._input_prefixes + (handle,)
        return handle

    def _pad(self, rows, with_image, padding_side) -> VLLMBatch:
        b, length = len(rows), max(len(r[0]) for r in rows)
        d, dev = rows[0][0].shape[-1], self.device
        embeds = torch.zeros(b, length, d, dtype=rows[0][0].dtype, device=dev)
        mask = torch.zeros(b, length, dtype=torch.long, device=dev)
        token_ids = torch.full((b, length), -1, dtype=torch.long, device=dev)
        labels = torch.zeros(b, length, dtype=torch.long, device=dev)
        label_mask = torch.zeros(b, length, dtype=torch.bool, device=dev)
        spans = torch.zeros(3, b, 2, dtype=torch.long)  # vision, query, target
        for i, (e, ids, (v0, v1), t0) in enumerate(rows):
            n = len(e)
            off = 0 if padding_side == "right" else length - n
            embeds[i, off:off + n] = e
            mask[i, off:off + n] = 1
            token_ids[i, off:off + n] = ids
            if t0 < n:  # position t predicts token t+1: positions t0-1 .. n-2 predict the target
                labels[i, off + t0 - 1:off + n - 1] = ids[t0:]
                label_mask[i, off + t0 - 1:off + n - 1] = True
            q0 = v1 if v1 > v0 else 0
            spans[0, i] = torch.tensor([v0 + off, v1 + off]) if v1 > v0 else torch.tensor([0, 0])
            spans[1, i] = torch.tensor([q0 + off, t0 + off])
            spans[2, i] = torch.tensor([t0 + off, n + off])
        return VLLMBatch(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                         token_ids=token_ids, vision_spans=spans[0].to(dev), query_spans=spans[1].to(dev),
                         target_spans=spans[2].to(dev), labels=labels, label_mask=label_mask,
                         has_image=torch.tensor(with_image, device=dev))

    # ---- layer edits ------------------------------------------------------------------------------
    def edit_layer(self, layer: int, fn: EditFn) -> LayerEdit:
        """Edit decoder layer `layer`'s output on every later pass: `fn(hidden [b, l, D], call: LayerCall)`
        returns the new hidden state or None (unchanged). Returns the handle (`.remove()`, or a `with` block)."""
        return self.hooks.edit(layer, fn)

    def unedited(self):
        """Context manager: the passes this thread runs inside it have every layer edit off."""
        return self.hooks.unedited()

    # ---- running the LM -----------------------------------------------------------------------
    def last_hidden(self, batch: VLLMBatch) -> torch.Tensor:
        """Final hidden states [b, l, d] (after the final norm) of the whole model, layer edits active,
        on `self.device`."""
        return self._final_hidden(batch).to(self.device)

    def _final_hidden(self, batch: VLLMBatch) -> torch.Tensor:
        with self.hooks.running(batch, "full"):
            hidden, _ = self.stack.hidden(batch.inputs_embeds, batch.attention_mask, batch.position_ids,
                                          **batch.layer_inputs())
        return hidden  # [b, l, d] on the final norm's device

    def forward(self, batch: VLLMBatch) -> torch.Tensor:
        """Logits [b, l, V] of the whole model (layer edits active), on `self.device`."""
        return self.stack.lm_head(self._final_hidden(batch)).to(self.device)

    def hidden_at_layer(self, batch: VLLMBatch, layer: int) -> torch.Tensor:
        """Output [b, l, d] of decoder layer `layer` (0-based, edits on it applied) on `device_of_layer(layer)`;
        later layers are not run."""
        with self.hooks.running(batch, "full") as run, self.hooks.capture(run, layer):
            try:
                self.stack.hidden(batch.inputs_embeds, batch.attention_mask, batch.position_ids,
                                  **batch.layer_inputs())
            except StopForward:
                pass
        return run.captured

    def logits_from_layer(self, batch: VLLMBatch, hidden: torch.Tensor, layer: int,
                          positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from running layers layer+1..L-1 on `hidden` [b, l, d] (the output of `layer`).

        `positions` ([b, l] bool) keeps only those positions' logits ([n, V]) to save the
        full-vocabulary projection elsewhere. The logits come back on `self.device`.
        """
        with self.hooks.running(batch, "full"):
            final = self.stack.run_from(hidden, batch.attention_mask, batch.position_ids, layer + 1,
                                        **batch.layer_inputs())
        if positions is not None:
            final = final[positions.to(final.device)]  # [n, d]
        return self.stack.lm_head(final).to(self.device)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence | None = None,
                 max_new_tokens: int = 16) -> list[str]:
        """Greedy decoding with a KV cache; returns the new text of each row (EOS stops a row)."""
        from transformers import DynamicCache

        batch = self.prepare(prompts, images, None, padding_side="left")
        cache = DynamicCache(config=self.stack.config)
        eos = self.tokenizer.eos_token_id
        mask, pos = batch.attention_mask, batch.position_ids
        embeds, new_ids = batch.inputs_embeds, []
        extra = batch.layer_inputs()  # the prompt's only: new tokens are text
        done = torch.zeros(batch.size, dtype=torch.bool, device=self.device)
        with self.hooks.running(batch, "prefill") as run:
            for step in range(max_new_tokens):
                if step:
                    run.phase, run.step, extra = "decode", step, {}
                hidden, cache = self.stack.hidden(embeds, mask, pos, cache=cache, use_cache=True, **extra)
                next_ids = self.stack.lm_head(hidden[:, -1]).argmax(-1).to(self.device)  # [b]
                new_ids.append(torch.where(done, torch.full_like(next_ids, eos), next_ids))
                done |= next_ids == eos
                if bool(done.all()):
                    break
                embeds = self.stack.embed_tokens(next_ids[:, None])  # [b, 1, d]
                mask = torch.cat([mask, mask.new_ones(batch.size, 1)], dim=1)
                pos = pos[:, -1:] + 1
        ids = torch.stack(new_ids, dim=1).tolist()  # [b, n_new]
        return [self.tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
                for row in ids]
