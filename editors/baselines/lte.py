"""LTE-VL (spec §7 "LTE-VL"): Learning to Edit — retrieve the edit, prepend it, with a fine-tuned LLM.

Memory: per edit, the retriever's embedding of `prompt + ' ' + target` (the aux sentence encoder,
multi-qa-mpnet: pooled last hidden states, L2-normalised) and the backbone input embeddings of the
edit prefix "[Updated Information]" + prompt + " " + target + "\\n[Query]" WITH the edit's image
(one `prepare` row, built at edit time). Inference: `prepare` asks `_prefixes` (the backbone's
input-prefix extension): the query's prompt text is encoded, and when the best cosine is > 0.3 the
edit's prefix goes before the query row; labels stay on the query's target, so the prefix's logits
are dropped. Batched editing: yes (a chunk adds its rows to the memory; each is independent).

Training fine-tunes the whole LLM (`trainable_modules` = the decoder stack: embeddings, layers,
final norm, LM head), so a checkpoint holds the LLM weights; loading it puts them into the
backbone. The locality references (the ORIGINAL LLM's outputs) are computed once per run, before
any step, into the run folder (`lte_reference.py`): no second copy of the LLM is kept. The model
under evaluation is that fine-tuned LLM: `restore()` empties the memory, which gives back exactly
the fine-tuned LLM with no prefix — the paper's "before editing" model that locality is measured
against. It does not bring back the original backbone's weights (`remove()` neither): that model
is not LTE's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from editors.auxiliary import REAL_AUX, TINY_AUX, encode_texts, load_aux, masked_pool
from editors.base import TrainableEditor
from editors.baselines.saved import identity, load_state, request_entries, requests_from, save_state
from utils.errors import UserError
from utils.records import EditRecord, Sample
from .trained_common import real_rows



@dataclass
class LTEConfig:
    """LTE-VL's hyper-parameters (the authors' values as defaults)."""

    retriever_model: str = "multi-qa-mpnet-base-dot-v1"
    """Aux sentence encoder (`tiny-mpnet` on the tiny backbones)."""
    pooling: str = "mean"
    """Sentence embedding pooling: mean | cls (a sentence-transformers folder's 1_Pooling says which)."""
    retrieve_threshold: float = 0.3
    """Retrieve the best edit when its cosine similarity is above this."""
    prefix_head: str = "[Updated Information]"
    prefix_tail: str = "\n[Query]"
    lr: float = 5e-6
    """Adam learning rate of the LLM."""
    rel_lambda: float = 1.0
    gen_lambda: float = 1.0
    loc_lambda: float = 1.0
    seed: int = 0
    """Seeds the tiny aux stand-in."""

    def __post_init__(self):
        if self.retriever_model not in REAL_AUX and self.retriever_model not in TINY_AUX:
            raise UserError(f"LTE config retriever_model={self.retriever_model!r} is not an auxiliary model; "
                            f"valid: {', '.join(sorted(REAL_AUX) + list(TINY_AUX))}")
        if self.pooling not in ("mean", "cls"):
            raise UserError(f"LTE config pooling must be mean or cls, got {self.pooling!r}")
        if not (math.isfinite(self.retrieve_threshold) and -1 <= self.retrieve_threshold <= 1):
            raise UserError(f"LTE config retrieve_threshold is a cosine in [-1, 1], got {self.retrieve_threshold}")
        if not self.lr > 0:
            raise UserError(f"LTE config lr must be > 0, got {self.lr}")
        for key in ("rel_lambda", "gen_lambda", "loc_lambda"):
            if getattr(self, key) < 0:
                raise UserError(f"LTE config {key} must be >= 0, got {getattr(self, key)}")


class LTE(TrainableEditor):
    name = "lte_vl"
    config_class = LTEConfig
    supports_batch_edit = True  # adding to the retrieval memory: each edit is independent
    saves_edits = True          # the memory (keys and prefix embeddings)

    def __init__(self, vllm, config: LTEConfig):
        super().__init__(vllm, config)
        self.retriever = load_aux(config.retriever_model, vllm.device, seed=config.seed)
        self.retriever.model.requires_grad_(False)
        self.pooling = self.retriever.pooling if self.retriever.pooling != "mean" else config.pooling
        self.keys = torch.zeros(0, self.retriever.width, device=vllm.device)  # [m, w] unit vectors
        self.prefix_embeds: list[torch.Tensor] = []                            # per edit [p, D]
        self.requests: list[Sample] = []
        self.reference = None  # the run's stored locality references (lte_reference.py), training only
        self.is_training = False
        self._prefix = vllm.add_input_prefix(self._prefixes)

    # ---- Editor API ----------------------------------------------------------------------------
    @property
    def num_edits(self) -> int:
        return len(self.requests)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"llm": self.vllm.stack}

    def set_train(self, mode: bool) -> None:
        """The LLM gets gradients while training; it stays in eval mode (no dropout), like the frozen
        features of the other editors."""
        self.vllm.stack.requires_grad_(mode)
        self.vllm.stack.eval()
        self.is_training = mode

    def remove(self) -> None:
        super().remove()
        self._prefix.remove()

    def restore(self) -> None:
        self.keys, self.prefix_embeds, self.requests = self.keys[:0], [], []

    def prefix_text(self, request: Sample) -> str:
        return f"{self.config.prefix_head}{request.prompt} {request.target}{self.config.prefix_tail}"

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Texts -> unit sentence embeddings [n, w]."""
        hidden, mask, _ = encode_texts(self.retriever, texts)
        return nn.functional.normalize(masked_pool(hidden, mask, (self.pooling,)).float(), dim=-1)

    @torch.no_grad()
    def edit(self, requests: list[Sample]) -> None:
        """Add each request's key and edit prefix (with its image) to the memory."""
        if not requests:
            return
        self.keys = torch.cat([self.keys, self.encode([f"{r.prompt} {r.target}" for r in requests])])
        with self.vllm.unedited():
            batch = self.vllm.prepare([self.prefix_text(r) for r in requests], [r.image for r in requests], None)
        self.prefix_embeds.extend(real_rows(batch.inputs_embeds, batch.attention_mask))
        self.requests.extend(requests)

    def save_edits(self, directory: str) -> None:
        tensors = {"keys": self.keys} | {f"prefix.{i}": e for i, e in enumerate(self.prefix_embeds)}
        save_state(directory, tensors, identity(self) | {"num_edits": self.num_edits,
                                                            "requests": request_entries(self.requests)})

    def load_edits(self, directory: str) -> None:
        tensors, manifest = load_state(directory, identity(self), self.vllm.device)
        self.keys = tensors["keys"]
        self.prefix_embeds = [tensors[f"prefix.{i}"] for i in range(int(manifest["num_edits"]))]
        self.requests = requests_from(manifest["requests"])

    # ---- retrieval -----------------------------------------------------------------------------------
    @torch.no_grad()
    def retrieve(self, prompts: list[str]) -> list[int | None]:
        """Per query prompt, its most similar edit if the cosine is > the threshold, else None."""
        if not self.requests:
            return [None] * len(prompts)
        best, which = (self.encode(list(prompts)) @ self.keys.T).max(dim=1)  # [n]
        return [int(j) if b > self.config.retrieve_threshold else None
                for b, j in zip(best.tolist(), which.tolist())]

    def _prefixes(self, prompts: list[str], images) -> list[torch.Tensor | None]:
        if self.is_training or not self.requests:
            return [None] * len(prompts)
        return [None if j is None else self.prefix_embeds[j] for j in self.retrieve(prompts)]

    # ---- training (see lte_training.py) -------------------------------------------------------------
    def prepare_training(self, records: list[EditRecord], run_dir: str, fingerprint: str, say=None) -> None:
        """The locality references of `records` (the original LLM's outputs on their locality samples):
        computed now into `run_dir` (the backbone still holds its original weights: the trainer calls
        this before it loads a checkpoint), or read from there when a resumed run made them already."""
        from .lte_reference import prepare

        self.reference = prepare(self.vllm, records, run_dir, fingerprint, say)

    def make_optimizer(self):
        """Adam over the LLM."""
        return torch.optim.Adam(self.vllm.stack.parameters(), lr=self.config.lr), None

    def training_batch(self, records: list[EditRecord], rng: np.random.Generator):
        from .lte_training import prepare_batch

        return prepare_batch(self, records, rng)

    def train_step(self, batch) -> dict[str, float]:
        from .lte_training import train_step

        return train_step(self, batch)
