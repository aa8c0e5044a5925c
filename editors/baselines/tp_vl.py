"""TP-VL: T-Patcher (Huang et al., ICLR 2023) on a vision-language model (spec §7 "TP-VL").

Each edit adds ONE neuron ("patch") to the FFN of one LLM decoder layer (the last by default) and
trains it alone, the earlier patches frozen:
    OPT (BLIP-2):          a(x) = act(x·k + b)              in-layer fc1 (+ its bias), out-layer fc2
    Llama (LLaVA, MiniGPT-4): a(x) = act(x·k_gate) * (x·k_up)  in-layers gate_proj / up_proj, out down_proj
and the FFN output becomes FFN(x) + Σ_patches a_i(x) · v_i, x being the FFN input at every token.
A patch is trained for `steps` Adam steps (lr `lr`) on
    L_e + w_a · L_a + w_m · L_m
L_e: token-mean NLL of the target; L_a = mean exp(-a(x)) over the edit's positions that predict
the target (the patch must fire there); L_m = mean exp(ReLU(a(x))) over the tokens of one memory
paragraph (`memory_text.py`; the patch must stay off on ordinary text), drawn with the editor's
own seeded generator. The key starts as x̄ / |x̄|² (x̄: the mean FFN input at those positions, so
the patch starts at activation ~1 there, as in the authors' code), the bias at 0, the value at 0
(the new patch starts as a no-op).

The patches act through two forward hooks the editor owns, on the in-module (its input is x) and
on the out-module (its output gets the patches added); they exist only while there are patches,
so the unedited backbone runs hook-free and `restore()` is bit-identical. Patches accumulate over
edits (n edits = n neurons); one request per `edit` call, as in the paper (no batched editing).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import torch
from torch import nn

from editors.base import Editor
from editors.baselines import memory_text
from editors.baselines.ft import MLP_OUT
from editors.baselines.saved import load_state, save_state
from utils.errors import UserError
from utils.records import Sample

FFN_IN = {"blip2": "fc1", "llava": "mlp.up_proj", "minigpt4": "mlp.up_proj"}  # module whose input is x
GATED = {"blip2": False, "llava": True, "minigpt4": True}  # SwiGLU: act(gate·x) * (up·x)
ACTIVATION = {"blip2": "activation_fn", "llava": "mlp.act_fn", "minigpt4": "mlp.act_fn"}


@dataclass
class TPConfig:
    """T-Patcher's hyper-parameters (the reference's `configs/tp_vl/*.yaml`)."""

    layer: int = -1
    """Index into `vllm.layers` of the patched FFN (negative counts from the end; the paper: the last)."""
    lr: float = 1e-2
    """Adam learning rate of the new patch."""
    steps: int = 25
    """Adam steps per edit."""
    activation_weight: float = 1e-4
    """Weight of L_a (keep the patch active on the edit input)."""
    memory_weight: float = 1e-4
    """Weight of L_m (keep the patch inactive on the memory paragraph)."""
    memory_corpus: str | None = None
    """Plain-text file, one paragraph per line (WikiText-103 in the paper); null: the toy world's text
    facts. The environment variable LIVEEDIT_TP_MEMORY_CORPUS overrides it."""
    memory_min_words: int = 20
    """Paragraphs shorter than this (in words) are skipped, as are headings."""
    memory_max_tokens: int = 256
    """A memory paragraph is cut to its first this many tokens (the backbone's position limit)."""
    seed: int = 0
    """Seeds the editor's generator (which memory paragraph each edit draws)."""

    def __post_init__(self) -> None:
        checks = {"lr": self.lr > 0, "steps": self.steps >= 1, "activation_weight": self.activation_weight >= 0,
                  "memory_weight": self.memory_weight >= 0, "memory_min_words": self.memory_min_words >= 1,
                  "memory_max_tokens": self.memory_max_tokens >= 2}
        for key, ok in checks.items():
            if not ok:
                raise UserError(f"tp_vl config: {key} = {getattr(self, key)!r} is out of range "
                                f"(lr > 0, steps >= 1, weights >= 0, memory_min_words >= 1, memory_max_tokens >= 2)")


class TPatcher(Editor):
    """T-Patcher: one trained FFN neuron per edit in one LLM layer."""

    name = "tp_vl"
    config_class = TPConfig
    supports_batch_edit = False  # one neuron per edit, trained alone (the paper)
    saves_edits = True

    def __init__(self, vllm, config: TPConfig):
        config = replace(config, memory_corpus=memory_text.resolve_path(config.memory_corpus))
        super().__init__(vllm, config)
        n, family = vllm.num_layers, vllm.family
        if not -n <= config.layer < n:
            raise UserError(f"tp_vl config: layer {config.layer} does not exist: {vllm.name} has {n} decoder "
                            f"layers (use 0..{n - 1} or -1 for the last)")
        if family not in FFN_IN:
            raise UserError(f"T-Patcher does not know the FFN of backbone family {family!r}; known: {sorted(FFN_IN)}")
        self.layer = config.layer % n
        block = vllm.layers[self.layer]
        self.in_module, self.out_module = block.get_submodule(FFN_IN[family]), block.get_submodule(MLP_OUT[family])
        self.act = block.get_submodule(ACTIVATION[family])
        self.gated, self.has_bias = GATED[family], (not GATED[family]) and self.in_module.bias is not None
        self.paragraphs = memory_text.load_paragraphs(config.memory_corpus, config.memory_min_words)
        self.generator = torch.Generator().manual_seed(config.seed)
        d = vllm.hidden_size
        self.patches = {name: torch.zeros(0, *shape, device=vllm.device) for name, shape in self._shapes(d).items()}
        self.training_patch: dict[str, torch.Tensor] | None = None  # the neuron being trained (requires grad)
        self._torch_hooks: list = []
        self._pending: dict[int, torch.Tensor] = {}  # thread id -> patch activations [..., P] from in- to out-hook
        self._capture: list[torch.Tensor] | None = None

    def _shapes(self, d: int) -> dict[str, tuple]:
        shapes = {"key": (d,), "value": (d,)}
        if self.gated:
            shapes["key_up"] = (d,)
        if self.has_bias:
            shapes["bias"] = ()
        return shapes

    @property
    def num_edits(self) -> int:
        return int(self.patches["key"].shape[0])

    # ---- the patched FFN ------------------------------------------------------------------------
    def _params(self) -> dict[str, torch.Tensor]:
        """Every patch, the one in training last: name -> [P, ...] fp32."""
        if self.training_patch is None:
            return self.patches
        return {k: torch.cat([v, self.training_patch[k][None]]) for k, v in self.patches.items()}

    def activation(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Patch activations [..., P] of FFN inputs x [..., D], computed as the FFN computes its own."""
        x = x.float()
        pre = x @ params["key"].T  # [..., P]
        if "bias" in params:
            pre = pre + params["bias"]
        out = self.act(pre)
        return out * (x @ params["key_up"].T) if self.gated else out

    def _in_hook(self, module, args, output):
        x = args[0]  # [..., D] the FFN input
        if self._capture is not None:
            self._capture.append(x.detach())
        self._pending[threading.get_ident()] = self.activation(x, self._params())

    def _out_hook(self, module, args, output):
        a = self._pending.pop(threading.get_ident(), None)  # [..., P]
        if a is None:
            return None
        return output + (a @ self._params()["value"]).to(output.dtype)  # [..., D]

    def _attach(self) -> None:
        if not self._torch_hooks:
            self._torch_hooks = [self.in_module.register_forward_hook(self._in_hook),
                                 self.out_module.register_forward_hook(self._out_hook)]

    def _detach(self) -> None:
        for handle in self._torch_hooks:
            handle.remove()
        self._torch_hooks, self._pending = [], {}

    # ---- editing ------------------------------------------------------------------------------
    @torch.no_grad()
    def _ffn_inputs(self, batch) -> torch.Tensor:
        """FFN inputs [b, l, D] of the patched layer for `batch` (the patches do not change them)."""
        self._capture = []
        try:
            self.vllm(batch)
        finally:
            captured, self._capture = self._capture, None
        return captured[0].reshape(batch.size, batch.length, -1)

    def _memory_inputs(self) -> torch.Tensor:
        """FFN inputs [n, D] of the tokens of one memory paragraph, drawn with the editor's generator."""
        i = int(torch.randint(len(self.paragraphs), (1,), generator=self.generator))
        batch = self.vllm.prepare([self.paragraphs[i]], [None], None)
        cut = self.config.memory_max_tokens
        if batch.length > cut:
            batch = replace(batch, **{k: getattr(batch, k)[:, :cut] for k in
                                      ("inputs_embeds", "attention_mask", "position_ids", "token_ids", "labels",
                                       "label_mask")})
        return self._ffn_inputs(batch)[0]

    def edit(self, requests: list[Sample]) -> None:
        """Add and train one patch per request, in order, on top of the earlier ones."""
        for request in requests:
            self._attach()
            with torch.enable_grad():
                self._train_patch(request)

    def _train_patch(self, request: Sample) -> None:
        cfg = self.config
        batch = self.vllm.prepare([request.prompt], [request.image], [request.target])
        x_edit = self._ffn_inputs(batch)[batch.label_mask].float()  # [n, D] positions predicting the target
        x_memory = self._memory_inputs().float()  # [m, D]
        mean = x_edit.mean(0)
        key = (mean / mean.pow(2).sum()).clone()
        patch = {"key": key, "value": torch.zeros_like(key)}
        if self.gated:
            patch["key_up"] = key.clone()
        if self.has_bias:
            patch["bias"] = torch.zeros((), device=key.device)
        for p in patch.values():
            p.requires_grad_(True)
        self.training_patch = patch
        try:
            optimizer = torch.optim.Adam(list(patch.values()), lr=cfg.lr)
            for _ in range(cfg.steps):
                logits = self.vllm(batch)[batch.label_mask].float()  # [n, V]
                loss_e = nn.functional.cross_entropy(logits, batch.labels[batch.label_mask])
                single = {k: v[None] for k, v in patch.items()}
                loss_a = torch.exp(-self.activation(x_edit, single)).mean()
                loss_m = torch.exp(torch.relu(self.activation(x_memory, single))).mean()
                loss = loss_e + cfg.activation_weight * loss_a + cfg.memory_weight * loss_m
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            self.training_patch = None
        self.patches = {k: torch.cat([v, patch[k].detach()[None]]) for k, v in self.patches.items()}

    def restore(self) -> None:
        self._detach()
        self.patches = {k: v[:0] for k, v in self.patches.items()}
        self.generator.manual_seed(self.config.seed)

    # ---- persistence --------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"editor": self.name, "backbone": self.vllm.name, "layer": self.layer}

    def save_edits(self, directory: str) -> None:
        """The patches and the generator's state (a resumed run draws the same memory paragraphs)."""
        tensors = {**self.patches, "generator_state": self.generator.get_state()}
        save_state(directory, tensors, {**self._identity(), "num_edits": self.num_edits,
                                        "memory_corpus": self.config.memory_corpus})

    def load_edits(self, directory: str) -> None:
        tensors, _ = load_state(directory, self._identity())
        d = self.vllm.hidden_size
        patches = {}
        for name, shape in self._shapes(d).items():
            if name not in tensors or tuple(tensors[name].shape[1:]) != shape:
                raise UserError(f"{directory}: saved T-Patcher patches lack {name!r} of shape [P, {shape}]")
            patches[name] = tensors[name].to(self.vllm.device, torch.float32)
        self.restore()
        self.patches = patches
        self.generator.set_state(tensors["generator_state"])
        if self.num_edits:
            self._attach()
