"""FT-L and FT-M: edit by fine-tuning one weight matrix on the new target (spec §7 "FT-VL").

- FT-L fine-tunes an LLM weight: by default the MLP output projection of the last decoder layer
  (OPT `fc2`, Llama `mlp.down_proj`), reached through `vllm.layers[layer]`.
- FT-M fine-tunes the vision-to-language bridge (BLIP-2 `language_projection`, LLaVA
  `multi_modal_projector.linear_2`, MiniGPT-4 `llama_proj`), so text-only inputs never change.

One edit call = AdamW (fresh optimiser) on the token-mean NLL of the call's targets, for up to
`steps` steps; a step whose loss is below `stop_loss` is skipped and ends the edit (with one
request per call this is the reference's "skip the step / stop when the epoch mean is small").
Edits accumulate in the weight in place. `restore()` copies the original weight back, so the
model is bit-identical to the unedited one. Neither editor needs training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editors.base import Editor
from editors.baselines.saved import identity, load_state, save_state
from utils.errors import UserError
from utils.records import Sample

# family -> module path of the MLP output projection inside one decoder layer
MLP_OUT = {"blip2": "fc2", "llava": "mlp.down_proj", "minigpt4": "mlp.down_proj"}
# family -> module path of the vision-to-language bridge inside `vllm.model`
BRIDGE = {"blip2": "language_projection", "llava": "model.multi_modal_projector.linear_2",
          "minigpt4": "llama_proj"}


@dataclass
class FTConfig:
    """Hyper-parameters of FT-L / FT-M (the reference's `configs/ft_vl/*.yaml`)."""

    layer: int = -1
    """FT-L: index into `vllm.layers` of the decoder layer whose MLP output projection is tuned
    (negative counts from the end; the reference uses layer 31 = the last). Unused by FT-M."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (the reference: 0)."""
    steps: int = 25
    """Maximum optimiser steps per edit call."""
    stop_loss: float = 1e-2
    """Stop (without stepping) once the target NLL is below this."""
    batch_edit: bool = False
    """Let the evaluator pass a whole chunk to one `edit` call (joint fine-tuning). Off by default:
    the paper's protocol edits one request at a time."""

    def __post_init__(self) -> None:
        """Range checks; a UserError names the key (load_config adds the file)."""
        for ok, message in [(self.lr > 0, f"lr must be positive, got {self.lr!r}"),
                            (self.steps >= 1, f"steps must be at least 1, got {self.steps!r}"),
                            (self.weight_decay >= 0, f"weight_decay must be 0 or more, got {self.weight_decay!r}"),
                            (self.stop_loss >= 0, f"stop_loss must be 0 or more, got {self.stop_loss!r}")]:
            if not ok:
                raise UserError(message)


class FineTuneEditor(Editor):
    """Shared loop of FT-L and FT-M; subclasses choose the tuned module."""

    config_class = FTConfig
    saves_edits = True  # the tuned weight (weights change in place: no layer edit, no hook)
    inputs_depend_on_weight = False  # True when the image features pass through the tuned weight

    def __init__(self, vllm, config: FTConfig):
        super().__init__(vllm, config)
        self.module_path, self.module = self.target_module()
        self.weight = self.module.weight
        self.original = self.weight.detach().clone()
        self._num_edits = 0

    def target_module(self) -> tuple[str, nn.Module]:
        """(readable path, the module whose `weight` is tuned)."""
        raise NotImplementedError

    @property
    def supports_batch_edit(self) -> bool:  # Editor's capability, decided by the config here
        return self.config.batch_edit

    @property
    def num_edits(self) -> int:
        return self._num_edits

    # ---- editing ------------------------------------------------------------------------------
    def edit(self, requests: list[Sample]) -> None:
        """Fine-tune the weight on all `requests` at once, on top of earlier edits."""
        if not requests:
            return
        self.weight.requires_grad_(True)
        try:
            with torch.enable_grad():
                self._optimise(requests)
        finally:
            self.weight.requires_grad_(False)
            self.weight.grad = None
        self._num_edits += len(requests)

    def _optimise(self, requests: list[Sample]) -> None:
        cfg = self.config
        optimizer = torch.optim.AdamW([self.weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
        batch = None if self.inputs_depend_on_weight else self._prepare(requests)
        for _ in range(cfg.steps):
            loss = self.target_nll(requests, batch)
            if loss.item() < cfg.stop_loss or not loss.requires_grad:
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def _prepare(self, requests: list[Sample]):
        return self.vllm.prepare([r.prompt for r in requests], [r.image for r in requests],
                                 [r.target for r in requests])

    def target_nll(self, requests: list[Sample], batch=None) -> torch.Tensor:
        """Token-mean NLL of the targets (a leading space joins prompt and target, as in the reference)."""
        if batch is None:
            batch = self._prepare(requests)
        logits = self.vllm(batch)  # [b, l, V]
        picked = logits[batch.label_mask].float()  # [n, V]
        return nn.functional.cross_entropy(picked, batch.labels[batch.label_mask])

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.original)
        self._num_edits = 0

    # ---- persistence --------------------------------------------------------------------------
    def save_edits(self, directory: str) -> None:
        """Write the tuned weight and the edit count, so `load_edits` can continue a run."""
        save_state(directory, {"weight": self.weight}, identity(self, module=self.module_path) | {"num_edits": self._num_edits})

    def load_edits(self, directory: str) -> None:
        tensors, manifest = load_state(directory, identity(self, module=self.module_path))
        weight = tensors["weight"]
        if weight.shape != self.weight.shape:
            raise UserError(f"saved weight in {directory} has shape {tuple(weight.shape)}, expected "
                            f"{tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight)
        self._num_edits = int(manifest["num_edits"])


def _lookup(table: dict[str, str], family: str, what: str) -> str:
    if family not in table:
        raise UserError(f"{what} is not known for backbone family {family!r}; known: {sorted(table)}")
    return table[family]


class FTL(FineTuneEditor):
    """FT-L: fine-tune the MLP output projection of one LLM decoder layer."""

    name = "ft_l"

    def target_module(self) -> tuple[str, nn.Module]:
        n = self.vllm.num_layers
        if not -n <= self.config.layer < n:
            raise UserError(f"FT layer {self.config.layer} does not exist: {self.vllm.name} has {n} decoder "
                            f"layers (use 0..{n - 1} or -1 for the last)")
        index = self.config.layer % n
        rel = _lookup(MLP_OUT, self.vllm.family, "the MLP output projection")
        return f"layers.{index}.{rel}", self.vllm.layers[index].get_submodule(rel)


class FTM(FineTuneEditor):
    """FT-M: fine-tune the vision-to-language bridge (only inputs with an image are affected)."""

    name = "ft_m"
    inputs_depend_on_weight = True

    def target_module(self) -> tuple[str, nn.Module]:
        path = _lookup(BRIDGE, self.vllm.family, "the vision-to-language bridge")
        return path, self.vllm.model.get_submodule(path)
