"""LEMoE-VL (spec §7 "LEMoE-VL"): a LoRA mixture of experts on one FFN, one new expert per 20 edits.

Edits are buffered; every `lora_edit_batch_size` (20) requests train ONE new expert on the FFN of
layer 30 (of 32) with Adam (lr 1e-4, up to 100 steps, stop once the loss is below 0.03) on the
token-mean NLL of the buffered targets; earlier experts stay frozen. Expert n adds

    E_n(x) = ReLU(x C1_n R1_nᵀ) C2_n R2_nᵀ          x: the FFN input [.., D]; C1 [D, r], R1 [H, r], C2 [H, r], R2 [D, r]

to the FFN output (H = the FFN's intermediate size, r = 32), mixed by the router

    g_n(x) = softmax_n < silu(q W_down_n) W_up_n , k_n >,   q = mean of x over the row's query tokens

where each expert has its own router projections W_down_n [D, D/4], W_up_n [D/4, D] and key k_n [D],
trained with the expert and frozen afterwards (as in the authors' code). Added at the layer output
through `hook_layer` (see `ffn_hooks.py` for why that equals adding to the FFN output).

Fixed versus the authors' code (spec W-19): the key k_n is trained (it was left out of the optimiser
and stayed random); the output-hook check compared the input module with itself (`not inpt is
inpt`, always False) where it meant "output module differs from input module" — here both hooks
belong to the editor and are removed by `remove()`, nothing else's hooks are cleared; the layer
index is an integer (its `llm_layer_tmp` had no `{}`, so training silently ran the whole model:
here it runs layers l..L-1 from the cached layer l-1 output); and inference with 1-19 pending edits
works: the pending edits are trained into an expert first (`flush()`, called by the layer edit
when any scoring or generating pass reaches the layer, or by the caller). The router averages x
over the query tokens (image + prompt) only, not over padding or the teacher-forced target, so a
row's routing is the same in teacher forcing, in `generate` and at any batch size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from editors.base import Editor
from editors.baselines.ffn_hooks import (FFN_INPUT, FFN_VALUE, InputCapture, check_pre_norm, hidden_before,
                                         masked_mean, query_mask, resolve_layer, submodule, target_nll)
from editors.baselines.saved import load_state, save_state
from utils.errors import UserError
from utils.records import Sample

PARTS = ("c1", "r1", "c2", "r2", "key", "w_down", "w_up")


@dataclass
class LEMoEConfig:
    """Hyper-parameters of LEMoE-VL (the reference's `configs/lemoe_vl/*.yaml`)."""

    layer: int = 30
    """Index into `vllm.layers` of the FFN that gets the experts (paper: 30 of 32; other depths map
    by relative depth, round(30/31*(L-1)))."""
    rank: int = 32
    """LoRA rank r of each expert."""
    expert_hidden: int = 0
    """Width H of an expert's hidden ReLU layer; 0 = the FFN's intermediate size."""
    router_hidden: int = 0
    """Width of the router projection W_down; 0 = hidden_size // 4 (the authors' choice)."""
    lora_edit_batch_size: int = 20
    """Buffered edits per new expert."""
    max_steps: int = 100
    """Adam steps per expert at most."""
    min_loss: float = 0.03
    """Stop training an expert once its loss is below this (checked after each step, as the authors)."""
    lr: float = 1e-4
    """Adam learning rate."""
    init_std: float = 0.01
    """Std of the normal initialisation of every new tensor (the authors' randn * 0.01)."""
    seed: int = 0
    """Seed of the editor's own generator (expert initialisation)."""

    def __post_init__(self):
        for key in ("rank", "lora_edit_batch_size", "max_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise UserError(f"lemoe_vl config key {key} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("expert_hidden", "router_hidden"):
            if getattr(self, key) < 0:
                raise UserError(f"lemoe_vl config key {key} must be 0 (automatic) or positive, got {getattr(self, key)}")
        for key in ("lr", "init_std"):
            if not getattr(self, key) > 0:
                raise UserError(f"lemoe_vl config key {key} must be positive, got {getattr(self, key)}")
        if self.min_loss < 0:
            raise UserError(f"lemoe_vl config key min_loss must be >= 0, got {self.min_loss}")


class LEMoE(Editor):
    """LEMoE-VL: buffered edits, one LoRA expert per `lora_edit_batch_size` of them, softmax router."""

    name = "lemoe_vl"
    config_class = LEMoEConfig
    supports_batch_edit = True  # `edit(list)` only buffers: the same experts as one request per call
    saves_edits = True

    def __init__(self, vllm, config: LEMoEConfig):
        super().__init__(vllm, config)
        check_pre_norm(vllm)
        self.layer = resolve_layer(vllm, config.layer)
        ffn_in = submodule(vllm, self.layer, FFN_INPUT, "the FFN input")
        self.dim = vllm.hidden_size
        self.hidden = config.expert_hidden or submodule(vllm, self.layer, FFN_VALUE, "the FFN value matrix").in_features
        self.router_dim = config.router_hidden or max(1, self.dim // 4)
        self._gen = torch.Generator().manual_seed(config.seed)
        self.experts: list[dict[str, torch.Tensor]] = []  # per expert: PARTS -> float32 tensor on the device
        self.pending: list[Sample] = []
        self._trained = 0
        self._training = False
        self.train_seconds = 0.0  # time spent training experts (the evaluator times `edit`, which only buffers)
        self._capture = InputCapture(ffn_in)
        self.hook_layer(self.layer, self._edit_layer)

    @property
    def num_edits(self) -> int:
        return self._trained + len(self.pending)

    # ---- editing ------------------------------------------------------------------------------
    def edit(self, requests: list[Sample]) -> None:
        """Buffer `requests`; each full buffer of `lora_edit_batch_size` trains a new expert."""
        self.pending.extend(requests)
        self._capture.enabled = True
        size = self.config.lora_edit_batch_size
        while len(self.pending) >= size:
            self._train_expert(self.pending[:size])
            self.pending = self.pending[size:]

    def flush(self) -> None:
        """Train the pending (< lora_edit_batch_size) edits into one expert now."""
        if self.pending and not self._training:
            requests, self.pending = self.pending, []
            try:
                self._train_expert(requests)
            except BaseException:
                self.pending = requests + self.pending
                raise

    def _new_expert(self) -> dict[str, torch.Tensor]:
        d, h, r, k = self.dim, self.hidden, self.config.rank, self.router_dim
        shapes = {"c1": (d, r), "r1": (h, r), "c2": (h, r), "r2": (d, r), "key": (d,), "w_down": (d, k),
                  "w_up": (k, d)}
        return {name: (torch.randn(shapes[name], generator=self._gen) * self.config.init_std)
                .to(self.vllm.device).requires_grad_(True) for name in PARTS}

    def _train_expert(self, requests: list[Sample]) -> None:
        """Add one expert and train it (and its router projections and key) on `requests`."""
        start = time.perf_counter()
        cfg = self.config
        expert = self._new_expert()
        self.experts.append(expert)
        self._training = True
        try:
            batch = self.vllm.prepare([r.prompt for r in requests], [r.image for r in requests],
                                      [r.target for r in requests])
            before = hidden_before(self.vllm, batch, self.layer)
            optimizer = torch.optim.Adam(list(expert.values()), lr=cfg.lr)
            with torch.enable_grad():
                for _ in range(cfg.max_steps):
                    loss = target_nll(self.vllm, batch, self.layer, before)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if loss.item() < cfg.min_loss:
                        break
        except BaseException:
            self.experts.pop()
            raise
        finally:
            self._training = False
            for t in expert.values():
                t.requires_grad_(False)
                t.grad = None
        self._trained += len(requests)
        self.train_seconds += time.perf_counter() - start

    # ---- inference ----------------------------------------------------------------------------
    def gates(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Router weights [b, N] of rows x [b, l, D] (float32) averaged over `mask` [b, l]."""
        q = masked_mean(x, mask)  # [b, D]
        logits = [(nn.functional.silu(q @ e["w_down"]) @ e["w_up"]) @ e["key"] for e in self.experts]  # N x [b]
        return torch.softmax(torch.stack(logits, dim=1), dim=1)

    def mixture(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_n g_n E_n(x): [b, l, D] (float32), one expert at a time (no [b, l, N, H] intermediate)."""
        out = torch.zeros_like(x)
        for n, e in enumerate(self.experts):
            hidden = torch.relu((x @ e["c1"]) @ e["r1"].T)  # [b, l, H]
            out = out + gates[:, n, None, None] * ((hidden @ e["c2"]) @ e["r2"].T)
        return out

    def _edit_layer(self, hidden: torch.Tensor, call):
        x = self._capture.pop(hidden.shape[0], hidden.shape[1])
        if x is None:
            return None
        self.flush()  # inference with pending edits: train them first (the outer pass's x is kept)
        if not self.experts:
            return None
        x = x.float()
        if call.phase == "decode":
            gates = call.memo["gates"]
        else:
            gates = self.gates(x, query_mask(call.batch, hidden.shape[1]))
            call.memo["gates"] = gates
        return hidden + self.mixture(x, gates).to(hidden.dtype)

    # ---- restore, remove, persistence ---------------------------------------------------------
    def restore(self) -> None:
        self.experts, self.pending, self._trained = [], [], 0
        self._gen.manual_seed(self.config.seed)
        self._capture.enabled = False

    def remove(self) -> None:
        super().remove()
        self._capture.remove()

    def _identity(self) -> dict:
        return {"editor": self.name, "backbone": self.vllm.name, "layer": self.layer, "dim": self.dim,
                "hidden": self.hidden, "rank": self.config.rank, "router_dim": self.router_dim}

    def save_edits(self, directory: str) -> None:
        """Experts and generator state (safetensors) + the pending requests (a JSON manifest)."""
        tensors = {f"{n}.{part}": t for n, e in enumerate(self.experts) for part, t in e.items()}
        tensors["generator"] = self._gen.get_state()
        pending = [{"prompt": r.prompt, "target": r.target, "image": r.image} for r in self.pending]
        if any(p["image"] is not None and not isinstance(p["image"], str) for p in pending):
            raise UserError("lemoe_vl can only save pending edits whose image is a file path")
        save_state(directory, tensors, self._identity() | {"experts": len(self.experts),
                                                            "trained_edits": self._trained, "pending": pending})

    def load_edits(self, directory: str) -> None:
        tensors, manifest = load_state(directory, self._identity())
        self.experts = [{part: tensors[f"{n}.{part}"].to(self.vllm.device) for part in PARTS}
                        for n in range(int(manifest["experts"]))]
        self._gen.set_state(tensors["generator"])
        self._trained = int(manifest["trained_edits"])
        self.pending = [Sample(p["prompt"], p["target"], p["image"]) for p in manifest["pending"]]
        self._capture.enabled = bool(self.experts or self.pending)
