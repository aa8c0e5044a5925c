"""MEND-VL: edit the FFN linears of the last LLM layers with a learned transform of their gradients.

MEND (Mitchell et al., ICLR 2022) as the LiveEdit authors ran it for VLLMs (spec §7 "MEND-VL"):
- Edited modules: the FFN linears of `config.layers` (default the last three decoder layers):
  BLIP-2 `fc1` / `fc2`, LLaVA and MiniGPT-4 `mlp.gate_proj` / `mlp.up_proj` / `mlp.down_proj`.
- Edit: the target NLL (sum over requests of each request's token-mean NLL) on the model as it is
  now; per module, the input x of every token row (forward hook) and the gradient δ of the loss
  with respect to the module's output (`autograd.grad` on the captured outputs). Rows whose x or δ
  is all zero are dropped (positions after the last target token, padding). The shape's
  `GradientTransform` maps (x, δ) -> (x̃, δ̃), and the module's update is
  ΔW = x̃ᵀ δ̃ · lr_module / n_rows  [d_in, d_out], applied as out += input @ ΔW by a forward hook the
  editor owns on the module (it fires only inside the backbone's own passes, and not inside
  `vllm.unedited()`, like a layer edit). The backbone's weights never change.
- Sequential edits keep a running average of ΔW over all edited rows (the authors' behaviour):
  ΔW = (ΔW_old · n_old + Σ_new x̃ᵀ δ̃ · lr) / (n_old + n_new). So each edit's update is diluted by the
  rows of every other edit of the chunk (see docs/BASELINES.md, MEND-VL).
- A batched `edit` call takes all its gradients on the model as it was before the call; one by one,
  each gradient sees the earlier edits. Batched == the rows-weighted average of each request edited
  alone from the same model (a request's rows do not depend on its batch-mates).
Training (the learned transforms and per-module edit learning rates) is in `training.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from editors.base import TrainableEditor
from editors.baselines.saved import identity, load_state, save_state
from utils.errors import UserError
from utils.records import EditRecord, Sample
from .config import MENDConfig
from .networks import GradientTransform

# family -> FFN linears inside one decoder layer (the authors' edit_modules of their configs)
FFN_LINEARS = {"blip2": ("fc1", "fc2"),
               "llava": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
               "minigpt4": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@dataclass
class EditedLinear:
    """One edited module: where it is, its weight-shape group and its mode index in that group."""

    path: str          # e.g. "layers.31.fc1" (readable, for manifests and messages)
    module: nn.Linear
    group: str         # "<d_in>x<d_out>": the GradientTransform shared by this shape
    mode: int          # index of this module among the group's modules


class MENDVL(TrainableEditor):
    name = "mend_vl"
    config_class = MENDConfig
    saves_edits = True  # the averaged ΔW per module and its row counts

    def __init__(self, vllm, config: MENDConfig):
        super().__init__(vllm, config)
        self.targets = self._find_targets()
        shapes: dict[str, tuple[int, int, int]] = {}
        for t in self.targets:
            d_out, d_in = t.module.weight.shape
            shapes[t.group] = (d_in, d_out, shapes.get(t.group, (0, 0, 0))[2] + 1)
        generator = torch.Generator().manual_seed(config.seed)
        self.transforms = nn.ModuleDict({
            group: GradientTransform(d_in, d_out, config.rank, config.n_hidden, n_modes, config.norm, generator)
            for group, (d_in, d_out, n_modes) in shapes.items()}).to(vllm.device)
        self.edit_lrs = nn.ParameterList(nn.Parameter(torch.tensor(float(config.init_edit_lr)))
                                         for _ in self.targets).to(vllm.device)
        self._deltas: list[torch.Tensor | None] = [None] * len(self.targets)  # running mean ΔW [d_in, d_out]
        self._rows = [0] * len(self.targets)  # edited rows behind each running mean
        self._num_edits = 0
        # Scratch of the pass running now; the hook reads it only while `vllm.hooks.editing()` (this thread is in
        # a backbone pass with edits on), so the trainer's prefetch thread, whose passes run inside
        # `vllm.unedited()`, never sees it.
        self._training_deltas: list[torch.Tensor | None] | None = None  # training's ΔW (train_step)
        self._captures: dict | None = None  # module index -> (x, output) while an edit signal is taken
        self._handles = [t.module.register_forward_hook(partial(self._module_hook, i))
                         for i, t in enumerate(self.targets)]
        self.set_train(False)

    def _find_targets(self) -> list[EditedLinear]:
        vllm, n = self.vllm, self.vllm.num_layers
        bad = [layer for layer in self.config.layers if not -n <= layer < n]
        if bad:
            raise UserError(f"MEND config: layers {bad} do not exist; {vllm.name} has decoder layers 0..{n - 1} "
                            f"(negative values count from the end)")
        indices = sorted(layer % n for layer in self.config.layers)
        if len(set(indices)) != len(indices):
            raise UserError(f"MEND config: layers {self.config.layers} name the same layer twice on {vllm.name}")
        if indices[0] == 0:
            raise UserError("MEND config: layers must not include layer 0 (the edit signal starts from the output "
                            "of the layer before the first edited one)")
        if vllm.family not in FFN_LINEARS:
            raise UserError(f"MEND-VL knows the FFN linears of {sorted(FFN_LINEARS)}, not of {vllm.family!r}")
        targets, modes = [], {}
        for index in indices:
            for rel in FFN_LINEARS[vllm.family]:
                module = vllm.layers[index].get_submodule(rel)
                if not isinstance(module, nn.Linear):
                    raise UserError(f"layers.{index}.{rel} of {vllm.name} is a {type(module).__name__}, "
                                    f"not a linear layer")
                d_out, d_in = module.weight.shape
                group = f"{d_in}x{d_out}"
                targets.append(EditedLinear(f"layers.{index}.{rel}", module, group, modes.get(group, 0)))
                modes[group] = modes.get(group, 0) + 1
        return targets

    @property
    def first_layer(self) -> int:
        """The first edited decoder layer: the edit signal runs layers first_layer.. from its input."""
        return int(self.targets[0].path.split(".")[1])

    @property
    def supports_batch_edit(self) -> bool:  # decided by the config (see MENDConfig.batch_edit)
        return self.config.batch_edit

    @property
    def num_edits(self) -> int:
        return self._num_edits

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"transforms": self.transforms, "edit_lrs": self.edit_lrs}

    # ---- the hook on each edited module ---------------------------------------------------------------
    def _module_hook(self, index: int, module, args, output):
        """out + input @ ΔW (training's ΔW during a training step, else the edits'), only inside the backbone's
        own passes and not inside `vllm.unedited()`; records (x, out) while an edit signal is taken."""
        if not self.vllm.hooks.editing():
            return None
        training, captures = self._training_deltas, self._captures
        delta = training[index] if training is not None else self._deltas[index]
        out = output
        if delta is not None:
            x = args[0]  # [b, l, d_in]
            out = output + (x.to(delta.dtype) @ delta).to(output.dtype)  # [b, l, d_out]
        if captures is not None:
            captures[index] = (args[0].detach(), out)
        return None if out is output else out

    # ---- the edit signal and the update ------------------------------------------------------------------
    def hidden_before_edits(self, batch) -> torch.Tensor:
        """Output [b, l, D] of the layer before the first edited one (no gradient; edits there are off)."""
        with torch.no_grad():
            return self.vllm.hidden_at_layer(batch, self.first_layer - 1)

    def edit_signal(self, batch, hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per edited module, (x rows [n, d_in], δ rows [n, d_out]) of the target NLL of `batch`, from `hidden`
        (the output of layer first_layer - 1); rows whose x or δ is all zero are dropped."""
        h = hidden.detach().requires_grad_(True)
        self._captures = captures = {}
        try:
            with torch.enable_grad():
                logits = self.vllm.logits_from_layer(batch, h, self.first_layer - 1,
                                                     positions=batch.label_mask).float()  # [n, V]
                loss = request_nll_sum(logits, batch)
                if len(captures) != len(self.targets):
                    raise RuntimeError("MEND-VL cannot take an edit signal inside `vllm.unedited()` (its module "
                                       "hooks are off there)")
                outputs = [captures[i][1] for i in range(len(self.targets))]
                grads = torch.autograd.grad(loss, outputs, allow_unused=True)
        finally:
            self._captures = None
        signal = []
        for i, grad in enumerate(grads):
            x = captures[i][0]
            x_rows = x.reshape(-1, x.shape[-1])  # [b*l, d_in]
            d_rows = (torch.zeros_like(outputs[i]) if grad is None else grad).reshape(-1, outputs[i].shape[-1])
            keep = (x_rows != 0).any(-1) & (d_rows != 0).any(-1)  # [b*l]
            signal.append((x_rows[keep].detach(), d_rows[keep].detach()))
        return signal

    def updates(self, signal) -> list[tuple[torch.Tensor | None, int]]:
        """Per module (Σ_rows x̃ᵀ δ̃ · lr [d_in, d_out] or None, number of rows) from `edit_signal`'s rows."""
        out = []
        for i, (x, d) in enumerate(signal):
            target = self.targets[i]
            if len(x) == 0:
                out.append((None, 0))
                continue
            xt, dt = self.transforms[target.group](x, d, target.mode)  # [n, d_in], [n, d_out]
            out.append((xt.T @ dt * self.edit_lrs[i], len(x)))  # [d_in, d_out]
        return out

    # ---- Editor API --------------------------------------------------------------------------------------
    def edit(self, requests: list[Sample]) -> None:
        """Edit `requests` in one pass (gradients on the model as it is now); fold the update into each
        module's running average of ΔW over all edited rows."""
        if not requests:
            return
        batch = self.vllm.prepare([r.prompt for r in requests], [r.image for r in requests],
                                  [r.target for r in requests])
        signal = self.edit_signal(batch, self.hidden_before_edits(batch))
        with torch.no_grad():
            for i, (total, n) in enumerate(self.updates(signal)):
                if n == 0:
                    continue
                old, m = self._deltas[i], self._rows[i]
                self._deltas[i] = total / n if old is None else (old * m + total) / (m + n)
                self._rows[i] = m + n
        self._num_edits += len(requests)

    def restore(self) -> None:
        """Drop every ΔW: the hooks return the modules' own outputs (the weights never changed)."""
        self._deltas = [None] * len(self.targets)
        self._rows = [0] * len(self.targets)
        self._num_edits = 0

    def remove(self) -> None:
        super().remove()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- persistence -------------------------------------------------------------------------------------
    def save_edits(self, directory: str) -> None:
        """Write each module's running ΔW (safetensors) and its row count (JSON manifest)."""
        tensors = {f"delta.{i}": d for i, d in enumerate(self._deltas) if d is not None}
        save_state(directory, tensors, identity(self, modules=[t.path for t in self.targets]) | {"rows": self._rows, "num_edits": self._num_edits})

    def load_edits(self, directory: str) -> None:
        tensors, manifest = load_state(directory, identity(self, modules=[t.path for t in self.targets]))
        deltas = []
        for i, t in enumerate(self.targets):
            delta = tensors.get(f"delta.{i}")
            if delta is not None and tuple(delta.shape) != tuple(reversed(t.module.weight.shape)):
                raise UserError(f"saved ΔW of {t.path} in {directory} has shape {tuple(delta.shape)}, expected "
                                f"{tuple(reversed(t.module.weight.shape))}")
            deltas.append(None if delta is None else delta.to(self.vllm.device))
        self._deltas, self._rows = deltas, [int(n) for n in manifest["rows"]]
        self._num_edits = int(manifest["num_edits"])

    # ---- training (see training.py) ----------------------------------------------------------------------
    def make_optimizer(self):
        from .training import make_optimizer

        return make_optimizer(self)

    def training_batch(self, records: list[EditRecord], rng: np.random.Generator):
        from .training import prepare_training_batch

        return prepare_training_batch(self, records, rng)

    def train_step(self, batch) -> dict[str, float]:
        from .training import training_step

        return training_step(self, batch)


def request_nll_sum(logits: torch.Tensor, batch) -> torch.Tensor:
    """Sum over the batch's requests of each one's token-mean NLL: logits [n, V] on `batch.label_mask`.

    For one request this is the authors' label_loss; for several, each request's gradient is what it
    would be alone (the token mean over the whole batch would scale it by the batch-mates' lengths)."""
    mask = batch.label_mask
    nll = nn.functional.cross_entropy(logits, batch.labels[mask], reduction="none")  # [n]
    row = mask.nonzero()[:, 0]  # [n]
    sums = torch.zeros(mask.shape[0], device=nll.device).index_add(0, row, nll)  # [b]
    return (sums / mask.sum(1).clamp(min=1)).sum()
