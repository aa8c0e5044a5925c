"""WISE (Wang et al., NeurIPS 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing
of Large Language Models"): edits go to a side copy of one FFN value matrix, routed by activation.

- Side memory: a copy W_v' of the value (down / out) projection of a mid-to-late layer (the paper's
  layer 27 of LLaMA-2-7B's 32, Appendix A.3; OPT `fc2`, Llama `mlp.down_proj`). The main memory W_v
  stays frozen. Kept as deltas in `wise_memory.SideMemory` (knowledge shards, masks, Ties-Merge).
- Editing one request (the paper edits one at a time): SGD (lr 1.0) on the current shard's copy,
  gradients masked by that shard's random mask (ratio ρ = 0.2), for up to 70 steps, minimising
  L = −log P(target | x_e) (side memory in place) + L_a, with the routing margin loss (Eq. 5)
      L_a = max(0, Δ(x_i) − α) + max(0, β − Δ(x_e)) + max(0, γ − (Δ(x_e) − Δ(x_i))),
  α = 5, β = 20, γ = 10, where Δ(x) = mean over x's query tokens of ||A(x)(W_v' − W_v)||₂ (Eq. 3) and
  x_i are irrelevant texts (`memory_corpus`, or the toy world's text facts). Each step clamps
  W_v' − W_v to ±norm_constraint; training stops early when the loss is ≤ 0.02 and changed by ≤ 1e-4.
  Afterwards ε = min(ε, Δ(x_e)) (Algorithm 1).
- Inference (Eq. 6, Algorithm 2): per row, Δ(x) with the merged side memory; if Δ(x) > act_ratio·ε
  the row's FFN uses W_v' (the term A(x)(W_v' − W_v) is added at the layer output, `ffn_hooks.py`),
  else W_v (the row is untouched, bit for bit). `generate` routes once at the prefill.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from editors.base import Editor
from editors.baselines.ffn_hooks import (FFN_VALUE, InputCapture, check_pre_norm, hidden_before, masked_mean,
                                         query_mask, resolve_layer, submodule, target_nll)
from editors.baselines.saved import load_state, save_state
from editors.baselines.wise_memory import SideMemory
from utils.errors import UserError
from utils.records import Sample


@dataclass
class WISEConfig:
    """Hyper-parameters of WISE; sources: the paper's Table 10 / Appendix A.3, else the authors' released
    EasyEdit `hparams/WISE/llama-7b.yaml` (marked "code")."""

    layer: int = 27
    """Index into `vllm.layers` of the side memory's FFN (paper: 27 of 32; round(27/31*(L-1)) otherwise)."""
    lr: float = 1.0
    """SGD learning rate η (paper Table 10)."""
    n_iter: int = 70
    """SGD steps per edit at most (code: n_iter 70)."""
    mask_ratio: float = 0.2
    """ρ: probability that a parameter belongs to a shard's subspace (paper Table 10)."""
    num_shards: int = 2
    """k: knowledge shards merged into the side memory (paper Table 10)."""
    shard_size: int = 500
    """Edits per shard before the next one (code: save_freq 500, merge_freq 1000 = k x 500; paper §3.3:
    "20% FFN parameters can accommodate at least 500 edited samples")."""
    alpha: float = 5.0
    """Routing margin: irrelevant inputs' activation score should stay below α (paper Table 10)."""
    beta: float = 20.0
    """Edits' activation score should exceed β (paper Table 10)."""
    gamma: float = 10.0
    """Edit and irrelevant scores should differ by at least γ (paper Table 10)."""
    act_ratio: float = 0.88
    """Inference routes to the side memory when Δ(x) > act_ratio · ε (code: act_ratio 0.88)."""
    norm_constraint: float = 1.0
    """|W_v' − W_v| is clamped to this per entry after each step (code: norm_constraint 1.0)."""
    merge_density: float = 0.53
    """Ties-Merge trim: fraction of each shard's update kept (code: densities 0.53)."""
    stop_loss: float = 0.02
    """Early stop once the loss is ≤ this and changed by ≤ stop_delta (code: EarlyStopMeter)."""
    stop_delta: float = 1e-4
    n_irrelevant: int = 1
    """Irrelevant texts per edit for the routing loss (code: one locality prompt per edit)."""
    memory_corpus: str = ""
    """Text file of irrelevant passages, one per line; "" = the toy world's text facts."""
    seed: int = 0
    """Seed of the editor's generator (shard masks, irrelevant-text draws)."""

    def __post_init__(self):
        for key in ("n_iter", "num_shards", "shard_size", "n_irrelevant"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise UserError(f"wise config key {key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("mask_ratio", "merge_density", "act_ratio"):
            if not 0 < getattr(self, key) <= 1:
                raise UserError(f"wise config key {key} must be in (0, 1], got {getattr(self, key)}")
        for key in ("lr", "norm_constraint"):
            if not getattr(self, key) > 0:
                raise UserError(f"wise config key {key} must be positive, got {getattr(self, key)}")
        for key in ("alpha", "beta", "gamma", "stop_loss", "stop_delta"):
            if getattr(self, key) < 0:
                raise UserError(f"wise config key {key} must be >= 0, got {getattr(self, key)}")


def irrelevant_texts(path: str) -> list[str]:
    """The irrelevant passages: the lines of `path`, or the toy world's text facts."""
    if not path:
        from toyworld.world import text_facts, text_prompt

        return [text_prompt(f.loc) + " " + f.answer for f in text_facts()]
    if not os.path.isfile(path):
        raise UserError(f"wise config key memory_corpus: file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise UserError(f"wise config key memory_corpus: {path} holds no text")
    return lines


def activation_score(acts: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Δ(x) per row: mean over `mask` [b, l] of ||A(x) deltaᵀ||₂, acts [b, l, I], delta [D, I] -> [b]."""
    return masked_mean((acts @ delta.T).norm(dim=-1), mask)


class WISE(Editor):
    """WISE-Merge: one side memory, knowledge shards, Ties-Merge, activation routing."""

    name = "wise"
    config_class = WISEConfig
    supports_batch_edit = False  # the paper edits one request at a time in the lifelong setting
    saves_edits = True

    def __init__(self, vllm, config: WISEConfig):
        super().__init__(vllm, config)
        check_pre_norm(vllm)
        self.layer = resolve_layer(vllm, config.layer)
        value = submodule(vllm, self.layer, FFN_VALUE, "the FFN value matrix")
        self.corpus = irrelevant_texts(config.memory_corpus)
        self._gen = torch.Generator().manual_seed(config.seed)
        self.memory = SideMemory(tuple(value.weight.shape), config.num_shards, config.mask_ratio, config.shard_size,
                                 config.merge_density, self._gen, vllm.device)
        self._initial = (self.memory.masks, self._gen.get_state())  # what `restore` goes back to
        self._train_delta: torch.Tensor | None = None  # while training: the shard copy, applied to every row
        self._probe: list[torch.Tensor] | None = None  # while probing: collects A(x) of the pass
        self.train_seconds = 0.0
        self._capture = InputCapture(value)
        self.hook_layer(self.layer, self._edit_layer)

    @property
    def num_edits(self) -> int:
        return self.memory.num_edits

    @property
    def threshold(self) -> float:
        """Routing threshold act_ratio · ε (inf before the first edit)."""
        return self.config.act_ratio * self.memory.eps

    # ---- editing ------------------------------------------------------------------------------
    def edit(self, requests: list[Sample]) -> None:
        """Edit `requests` one after the other into the current shard."""
        for request in requests:
            self._edit_one(request)

    @torch.no_grad()
    def activations(self, batch) -> torch.Tensor:
        """A(x) [b, l, I] (float32) at the side memory's layer: the input of its value matrix."""
        self._probe, self._capture.enabled = [], True
        try:
            self.vllm.hidden_at_layer(batch, self.layer)
            return self._probe[0].float()
        finally:
            self._probe = None
            self._capture.enabled = self.memory.effective is not None

    def _irrelevant_batch(self):
        picks = torch.randint(len(self.corpus), (self.config.n_irrelevant,), generator=self._gen).tolist()
        return self.vllm.prepare([self.corpus[i] for i in picks], None, None)

    def _edit_one(self, request: Sample) -> None:
        start, cfg = time.perf_counter(), self.config
        batch = self.vllm.prepare([request.prompt], [request.image], [request.target])
        irrelevant = self._irrelevant_batch()
        before = hidden_before(self.vllm, batch, self.layer)
        acts_e, acts_i = self.activations(batch), self.activations(irrelevant)  # constant: layers < l are frozen
        mask_e = query_mask(batch, acts_e.shape[1])
        mask_i = query_mask(irrelevant, acts_i.shape[1])
        delta = self.memory.start().requires_grad_(True)  # [D, I]: this shard's W_v' − W_v
        grad_mask = self.memory.masks[self.memory.current]
        optimizer = torch.optim.SGD([delta], lr=cfg.lr)
        previous = math.inf
        self._capture.enabled = True
        try:
            with torch.enable_grad():
                for _ in range(cfg.n_iter):
                    self._train_delta = delta
                    nll = target_nll(self.vllm, batch, self.layer, before)
                    self._train_delta = None
                    d_e = activation_score(acts_e, delta, mask_e)  # [1]
                    d_i = activation_score(acts_i, delta, mask_i)  # [m]
                    routing = (torch.relu(d_i - cfg.alpha).mean() + torch.relu(cfg.beta - d_e).mean()
                               + torch.relu(cfg.gamma - (d_e - d_i)).mean())
                    loss = nll + routing
                    value = loss.item()
                    if abs(value - previous) <= cfg.stop_delta and value <= cfg.stop_loss:
                        break
                    previous = value
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    delta.grad.mul_(grad_mask)  # only this shard's random subspace moves
                    optimizer.step()
                    with torch.no_grad():
                        delta.clamp_(-cfg.norm_constraint, cfg.norm_constraint)
        finally:
            self._train_delta = None
            self._capture.enabled = self.memory.effective is not None
        with torch.no_grad():
            score = activation_score(acts_e, delta, mask_e).item()
        self.memory.store(delta.detach(), score)
        self._capture.enabled = True
        self.train_seconds += time.perf_counter() - start

    # ---- inference ----------------------------------------------------------------------------
    def _edit_layer(self, hidden: torch.Tensor, call):
        acts = self._capture.pop(hidden.shape[0], hidden.shape[1])
        if acts is None:
            return None
        if self._probe is not None:
            self._probe.append(acts.detach())
            return None
        if self._train_delta is not None:  # training: the shard copy replaces W_v for every row
            return hidden + (acts.float() @ self._train_delta.T).to(hidden.dtype)
        delta = self.memory.effective
        if delta is None:
            return None
        added = acts.float() @ delta.T  # [b, l, D]: A(x)(W_v' − W_v)
        if call.phase == "decode":
            route = call.memo["route"]
        else:
            score = masked_mean(added.norm(dim=-1), query_mask(call.batch, hidden.shape[1]))  # [b]
            route = score > self.threshold
            call.memo["route"] = route
        if not bool(route.any()):
            return None
        return torch.where(route[:, None, None], hidden + added.to(hidden.dtype), hidden)

    # ---- restore, remove, persistence ---------------------------------------------------------
    def restore(self) -> None:
        masks, state = self._initial
        self._gen.set_state(state)
        self.memory.reset(masks)
        self._capture.enabled = False

    def remove(self) -> None:
        super().remove()
        self._capture.remove()

    def _identity(self) -> dict:
        c = self.config
        return {"editor": self.name, "backbone": self.vllm.name, "layer": self.layer,
                "shape": list(self.memory.shape), "num_shards": c.num_shards}

    def save_edits(self, directory: str) -> None:
        """Side memory (base, shards, masks) and generator state (safetensors) + counters (JSON)."""
        tensors = self.memory.tensors() | {"generator": self._gen.get_state()}
        save_state(directory, tensors, self._identity() | {"memory": self.memory.state()})

    def load_edits(self, directory: str) -> None:
        tensors, manifest = load_state(directory, self._identity())
        self.memory.load(tensors, manifest["memory"])
        self._gen.set_state(tensors["generator"])
        self._capture.enabled = self.memory.effective is not None
