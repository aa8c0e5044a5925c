"""The one hook mechanism: scoped edits of a decoder layer's output (DESIGN.md §2, §7).

An editor edits layer i with `handle = vllm.edit_layer(i, fn)`; every later pass of the backbone
through layer i calls `fn(hidden, call)` with the layer's output `hidden` [b, l, D] and a
`LayerCall` that says which batch is running and in which phase:
    "full"     a whole-sequence pass: `vllm(batch)`, `hidden_at_layer`, `logits_from_layer`
    "prefill"  the first pass of `generate` (the prompt; fills the KV cache)
    "decode"   one new token per row of `generate` (hidden is [b, 1, D]; `call.step` = 1, 2, ...)
`fn` returns the new hidden state, or None to leave it unchanged. `handle.remove()` (or leaving
`with vllm.edit_layer(i, fn):`) detaches the edit; `with vllm.unedited():` runs the passes of its
block with every edit off. Edits fire only inside the backbone's own passes (a direct call of the
transformers modules is never edited).

The running call is kept per thread, here and nowhere else: the trainer's prefetch thread runs
the backbone while the main thread does, and each sees only its own call.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .batch import VLLMBatch

PHASES = ("full", "prefill", "decode")


class StopForward(Exception):
    """Raised at the layer `hidden_at_layer` wants, to end the pass there."""


@dataclass
class LayerCall:
    """What the backbone is running when an edited layer fires (an edit function's second argument)."""

    batch: VLLMBatch  # the running batch, on the layer's device; at "decode" the prompt batch of the same
                      # `generate` call
    phase: str        # "full" | "prefill" | "decode"
    step: int         # 0 for "full" and "prefill"; n at the n-th "decode" step
    layer: int        # index of the edited layer
    memo: dict        # this edit's scratch space for this call: the same dict at the prefill and at
                      # every decode step of one `generate` (e.g. routing computed once at prefill)


EditFn = Callable[[torch.Tensor, LayerCall], Optional[torch.Tensor]]


@dataclass
class _Run:
    """Per-thread state of one top-level pass (or one whole `generate`)."""

    batch: VLLMBatch
    phase: str
    step: int = 0
    stop_at: int | None = None       # layer whose output `hidden_at_layer` captures, then stops
    captured: torch.Tensor | None = None
    memos: dict = field(default_factory=dict)  # id(LayerEdit) -> its memo
    placed: dict = field(default_factory=dict)  # device -> `batch` on it (backbones over several devices)

    def batch_on(self, device: torch.device) -> VLLMBatch:
        """`batch` on `device` (itself when it is there already): an edited layer's device."""
        if device == self.batch.inputs_embeds.device:
            return self.batch
        if device not in self.placed:
            self.placed[device] = self.batch.to(device)
        return self.placed[device]


class LayerEdit:
    """Handle of one layer edit: `remove()` detaches it (idempotent); a context manager that removes on exit."""

    def __init__(self, hooks: "LayerHooks", layer: int, fn: EditFn):
        self._hooks, self.layer, self.fn = hooks, layer, fn
        self.active = True

    def remove(self) -> None:
        if self.active:
            self.active = False
            self._hooks._detach(self)

    def __enter__(self) -> "LayerEdit":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class LayerHooks:
    """Registry of the layer edits of one backbone and the per-thread call state they receive.

    One torch forward hook per layer that has an edit (or a capture in progress); it is removed
    again when the layer has none, so an unedited backbone runs with no hook at all.
    """

    def __init__(self, layers: nn.ModuleList):
        self._layers = layers
        self._edits: dict[int, tuple[LayerEdit, ...]] = {}  # copied on change: safe to iterate from any thread
        self._users: dict[int, int] = {}                    # edits + captures per layer
        self._torch_hooks: dict[int, object] = {}
        self._lock = threading.Lock()
        self._local = threading.local()                     # .run: _Run | None, .off: int

    # ---- edits -------------------------------------------------------------------------------
    def edit(self, layer: int, fn: EditFn) -> LayerEdit:
        if not -len(self._layers) <= layer < len(self._layers):
            raise IndexError(f"layer {layer} does not exist: the backbone has layers 0..{len(self._layers) - 1}")
        handle = LayerEdit(self, layer % len(self._layers), fn)
        with self._lock:
            self._edits[handle.layer] = self._edits.get(handle.layer, ()) + (handle,)
            self._use(handle.layer)
        return handle

    def _detach(self, handle: LayerEdit) -> None:
        with self._lock:
            self._edits[handle.layer] = tuple(h for h in self._edits[handle.layer] if h is not handle)
            self._release(handle.layer)

    def _use(self, layer: int) -> None:
        """Count one user of `layer`; the first installs the torch hook (caller holds the lock)."""
        self._users[layer] = self._users.get(layer, 0) + 1
        if layer not in self._torch_hooks:
            self._torch_hooks[layer] = self._layers[layer].register_forward_hook(
                lambda module, args, output: self._dispatch(layer, output))

    def _release(self, layer: int) -> None:
        self._users[layer] -= 1
        if self._users[layer] == 0:
            self._torch_hooks.pop(layer).remove()

    # ---- per-thread call state -------------------------------------------------------------------
    def _run(self) -> _Run | None:
        return getattr(self._local, "run", None)

    @contextlib.contextmanager
    def running(self, batch: VLLMBatch, phase: str = "full"):
        """The passes of this block, in this thread, run `batch` in `phase`; yields the state (generate
        moves it to "decode" between steps)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        previous, run = self._run(), _Run(batch, phase)
        self._local.run = run
        try:
            yield run
        finally:
            self._local.run = previous

    @contextlib.contextmanager
    def unedited(self):
        """Every layer edit is off for the passes this thread runs inside the block."""
        self._local.off = getattr(self._local, "off", 0) + 1
        try:
            yield
        finally:
            self._local.off -= 1

    def edits_on(self) -> bool:
        """False inside `unedited()` in this thread (the input prefixes of `VLLM.prepare` obey it)."""
        return not getattr(self._local, "off", 0)

    def editing(self) -> bool:
        """True while this thread runs one of the backbone's own passes with edits on (not inside
        `unedited()`): a forward hook an editor owns on a submodule (e.g. an FFN projection) asks
        this, so it fires exactly when a layer edit would."""
        return self._run() is not None and self.edits_on()

    def capture(self, run: _Run, layer: int) -> "contextlib.AbstractContextManager":
        """While the block runs, the pass of `run` stores layer `layer`'s (edited) output in
        `run.captured` and raises StopForward."""
        @contextlib.contextmanager
        def scope():
            run.stop_at = layer
            with self._lock:
                self._use(layer)
            try:
                yield
            finally:
                with self._lock:
                    self._release(layer)
                run.stop_at = None
        return scope()

    # ---- the torch hook ----------------------------------------------------------------------------
    def _dispatch(self, layer: int, output):
        run = self._run()
        if run is None:
            return None  # a pass outside the backbone's own methods: never edited
        hidden = output[0] if isinstance(output, tuple) else output  # [b, l, D]
        changed = False
        if not getattr(self._local, "off", 0):
            for handle in self._edits.get(layer, ()):
                call = LayerCall(run.batch_on(hidden.device), run.phase, run.step, layer,
                                 run.memos.setdefault(id(handle), {}))
                new = handle.fn(hidden, call)
                if new is not None:
                    hidden, changed = new, True
        if run.stop_at == layer:
            run.captured = hidden
            raise StopForward
        if not changed:
            return None
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
