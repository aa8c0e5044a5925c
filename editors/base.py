"""The editor interface every algorithm implements (LiveEdit and the baselines).

Contract (as in ROME's): after `restore()` the model computes exactly what it computed before the
first edit. Edits take effect on every later call of `vllm(batch)` / `vllm.generate(...)`, through
hooks or weight changes that the editor owns.

Capabilities are declared here, so callers ask the attribute and never probe with getattr/hasattr:
`supports_batch_edit` (one `edit` call may take a whole chunk), `saves_edits` (`save_edits` /
`load_edits` work), `needs_training` (a `TrainableEditor` with learned modules). An editor that
edits a layer's output does it through `self.hook_layer` (the backbone's one hook mechanism), so
`remove()` can detach it.

Trainable editors add what the generic trainer (`utils/training.py`) needs: their modules, an
optimiser, a way to turn records into a training batch (no gradient; may run in a prefetch
thread), and one training step (forward + backward; the trainer steps the optimiser).
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from editors.vllms import VLLM
from editors.vllms.hooks import EditFn, LayerEdit
from utils.records import EditRecord, Sample


class Editor:
    """Base class: edit a frozen backbone and undo the edits."""

    name: ClassVar[str] = ""            # registry key, e.g. "liveedit"
    config_class: ClassVar[type] = object
    needs_training: ClassVar[bool] = False  # True: a TrainableEditor, needs a trained checkpoint
    supports_batch_edit: bool = False       # True: `edit` takes a whole chunk at once (a property may decide per config)
    saves_edits: bool = False               # True: `save_edits` / `load_edits` are implemented
    edits_text_only: bool = True            # False: every request needs an image (LiveEdit's hard routing)

    def __init__(self, vllm: VLLM, config):
        self.vllm = vllm
        self.config = config
        self._layer_edits: list[LayerEdit] = []

    def hook_layer(self, layer: int, fn: EditFn) -> LayerEdit:
        """Edit decoder layer `layer`'s output through the backbone's hook mechanism (see
        `editors/vllms/hooks.py`); `remove()` detaches it."""
        handle = self.vllm.edit_layer(layer, fn)
        self._layer_edits.append(handle)
        return handle

    def remove(self) -> None:
        """Undo every edit and detach the editor's layer edits from the backbone (it is unusable afterwards)."""
        self.restore()
        for handle in self._layer_edits:
            handle.remove()
        self._layer_edits.clear()

    def routing_of(self, samples: list[Sample], own: list[int | None], batch_size: int) -> list[dict] | None:
        """Routing diagnostics per sample with the current edits: {"selected": experts selected,
        "own_selected": whether expert own[i] is among them, "own_weight": its soft weight}; None for an
        editor that does not route (runs/routing_report.py)."""
        return None

    @property
    def num_edits(self) -> int:
        raise NotImplementedError

    def edit(self, requests: list[Sample]) -> None:
        """Apply `requests` (prompt, image, target = the new answer) in order, on top of earlier edits."""
        raise NotImplementedError

    def restore(self) -> None:
        """Undo every edit: the backbone is bit-identical to the unedited one afterwards."""
        raise NotImplementedError

    def save_edits(self, directory: str) -> None:
        """Persist the current edits so `load_edits` can continue a lifelong run (if `saves_edits`)."""
        raise NotImplementedError(f"{self.name} cannot save its edits")

    def load_edits(self, directory: str) -> None:
        raise NotImplementedError(f"{self.name} cannot load saved edits")


class TrainableEditor(Editor):
    """An editor with learned modules (LiveEdit): adds the hooks the trainer calls."""

    needs_training: ClassVar[bool] = True
    # True: under torchrun, `training_batch` keeps only this rank's rows of the global batch
    # (utils/distributed.py `Shard`) and `train_step`'s loss is this rank's share (the sum over ranks
    # is the one-process loss; the trainer sums the gradients over ranks). False: one process only.
    supports_sharded_training: ClassVar[bool] = False

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Name -> module; their state dicts make the checkpoint (keys `<name>.<param>`)."""
        raise NotImplementedError

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, Any]:
        """(optimizer, lr scheduler or None) over `trainable_modules()`; the scheduler steps once per step."""
        raise NotImplementedError

    def prepare_training(self, records: list[EditRecord], run_dir: str, fingerprint: str, say=None) -> None:
        """Called once by the trainer before `Trainer` is built, so before a resumed run loads its
        checkpoint: the backbone holds its original weights. An editor that needs something of the
        original model for the whole split computes it here, keeps it under `run_dir` (the run folder)
        for a resume to read, keyed by the data `fingerprint`; `say` prints a line (or is None).
        Default: nothing."""

    def training_batch(self, records: list[EditRecord], rng: np.random.Generator) -> Any:
        """Everything a step needs that does not depend on trainable parameters (no grad)."""
        raise NotImplementedError

    def train_step(self, batch: Any) -> dict[str, float]:
        """Losses of one batch; calls backward on the total. Returns scalars to log, with "Loss" the total."""
        raise NotImplementedError

    def set_train(self, mode: bool) -> None:
        for module in self.trainable_modules().values():
            module.train(mode)
            module.requires_grad_(mode)
