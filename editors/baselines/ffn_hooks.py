"""The FFN of one decoder layer as LEMoE and WISE see it: a captured input plus a layer-output edit.

Both methods change what one layer's FFN adds to the residual stream. They do it with two hooks
that the editor owns:
- `InputCapture`: a forward pre-hook on an FFN submodule that keeps its latest input:
  the FFN input (OPT `fc1` / Llama `mlp`, i.e. the post-norm hidden state) for LEMoE, or the
  activation A(x) entering the value matrix (OPT `fc2` / Llama `mlp.down_proj`) for WISE;
- the editor's `hook_layer(layer, fn)` edit of that layer's output, which adds the method's term.

Why the layer output and not the FFN module's own output: every supported decoder layer is
pre-norm (Llama always; OPT with `do_layer_norm_before`, checked here), so its output is
`h + FFN(norm(h))` and adding a term to the FFN output is the same as adding it to the layer's
output (dropout is off at inference). The layer edit receives the running batch (attention mask,
target spans), which the methods' per-row means over the query need so that results never depend
on padding or batch size, and the `generate` phase/memo (route once at the prefill, reuse at every
decoding step).

Training runs layers `layer..L-1` from the cached output of layer `layer-1` (`run_from_layer`),
the step LEMoE's reference code meant to take (its layer template had no `{}`, spec W-19).
"""
from __future__ import annotations

import torch
from torch import nn

from editors.baselines.ft import MLP_OUT
from utils.errors import UserError

# family -> path (inside one decoder layer) of the module whose input is the FFN input
FFN_INPUT = {"blip2": "fc1", "llava": "mlp", "minigpt4": "mlp"}
FFN_VALUE = MLP_OUT  # the value matrix (down / out projection) whose input is the activation A(x)


def resolve_layer(vllm, layer: int, key: str = "layer") -> int:
    """Index into `vllm.layers` of config value `layer` (negative counts from the end)."""
    n = vllm.num_layers
    if not -n <= layer < n:
        raise UserError(f"config key {key}: layer {layer} does not exist, {vllm.name} has {n} decoder layers "
                        f"(use 0..{n - 1}; the configs map the paper's layer by relative depth)")
    return layer % n


def check_pre_norm(vllm) -> None:
    """Refuse a post-norm OPT (e.g. OPT-350m): there the FFN output is not added to the layer output as is."""
    if vllm.family == "blip2" and not getattr(vllm.stack.config, "do_layer_norm_before", True):
        raise UserError(f"{vllm.name}: this editor needs a pre-norm decoder (OPT do_layer_norm_before=True)")


def submodule(vllm, layer: int, table: dict[str, str], what: str) -> nn.Module:
    """The module at `table[family]` inside decoder layer `layer`."""
    if vllm.family not in table:
        raise UserError(f"{what} is not known for backbone family {vllm.family!r}; known: {sorted(table)}")
    return vllm.layers[layer].get_submodule(table[vllm.family])


class InputCapture:
    """Forward pre-hook on `module` that keeps its latest first input while `enabled`.

    One slot, not one per thread: these editors assume one thread runs the backbone at a time (the
    evaluator does; they have no training loop with a prefetch thread)."""

    def __init__(self, module: nn.Module):
        self._enabled = False
        self._value: torch.Tensor | None = None
        self._handle = module.register_forward_pre_hook(self._hook)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """Switching drops what was kept (a pass under `vllm.unedited()` captures without consuming)."""
        self._enabled = bool(value)
        self._value = None

    def _hook(self, module, args):
        if self._enabled:
            self._value = args[0]

    def pop(self, batch_size: int, length: int) -> torch.Tensor | None:
        """The captured input as [b, l, n] (OPT flattens it to [b*l, n]) and forget it; None if none.

        Every pass through the layer runs its FFN before the layer's output edit, so what is kept
        always belongs to the pass being edited."""
        value, self._value = self._value, None
        if value is None or not self._enabled:
            return None
        return value.reshape(batch_size, length, -1)

    def remove(self) -> None:
        self._handle.remove()


def query_mask(batch, length: int) -> torch.Tensor:
    """[b, l] bool: the positions of each row's query (image + prompt tokens), never padding or the
    target; in a `generate` prefill (no target) the whole prompt."""
    pos = torch.arange(length, device=batch.attention_mask.device)  # [l]
    return batch.attention_mask[:, :length].bool() & (pos[None, :] < batch.target_spans[:, :1])


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [b, l, ...] over the positions where `mask` [b, l] is True -> [b, ...]."""
    m = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.dim() - 2)))
    return (values * m).sum(1) / m.sum(1).clamp(min=1)


@torch.no_grad()
def hidden_before(vllm, batch, layer: int) -> torch.Tensor | None:
    """Output [b, l, D] of layer `layer-1` (None for layer 0: training then runs the whole model)."""
    return None if layer == 0 else vllm.hidden_at_layer(batch, layer - 1)


def run_from_layer(vllm, batch, layer: int, before: torch.Tensor | None) -> torch.Tensor:
    """Logits [n, V] at the label positions, running layers `layer..L-1` on `before` (grad flows)."""
    if before is None:
        return vllm(batch)[batch.label_mask]
    return vllm.logits_from_layer(batch, before, layer - 1, positions=batch.label_mask)


def target_nll(vllm, batch, layer: int, before: torch.Tensor | None) -> torch.Tensor:
    """Token-mean NLL of the batch's targets (the reference's `label_loss`)."""
    logits = run_from_layer(vllm, batch, layer, before).float()  # [n, V]
    return nn.functional.cross_entropy(logits, batch.labels[batch.label_mask])
