"""GRACE (Hartvigsen et al., NeurIPS 2023, "Aging with GRACE"): a discrete key-value codebook at one layer.

Codebook entry = (key, value, radius ε, target). At layer `layer`'s output, for each row:
    query q = the layer's hidden state at the last prompt token (the query span's last position);
    nearest key k_i by Euclidean distance d; if d <= ε_i the layer output is REPLACED by v_i at the
    last prompt token and every later position (the target tokens when teacher-forced; at
    `generate`, the prompt's last position at the prefill and every generated token at "decode");
    otherwise the row is untouched.
Text-only and image rows are treated alike (the same hidden state), as GRACE is modality-agnostic.

An edit (prompt, image, target) with query q:
    empty codebook, or d > init_epsilon + ε_i  -> new entry (q, cold value, init_epsilon, target);
    d within that reach, different target     -> new entry, and both radii split to d / 2;
    d within that reach, same target          -> no new entry; ε_i grows to d if d > ε_i ("coverage"),
                                                 and v_i is trained further on this edit.
The chosen value is trained with Adam (lr `lr`, `steps` steps) on the target's token-mean NLL with
the replacement in place; a new value starts "cold" (uniform [0, 1), the editor's seeded
generator). Defaults are GRACE's own (edit_lr 1.0, n_iter 100, eps 1.0, Euclidean, cold values).
Edits depend on the codebook left by the earlier ones, so they are applied one per `edit` call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editors.base import Editor
from editors.baselines.saved import load_state, save_state
from utils.errors import UserError
from utils.records import Sample


@dataclass
class GRACEConfig:
    """GRACE's hyper-parameters (its paper's defaults) and the edited layer."""

    layer: int = 21
    """Index into `vllm.layers` whose output holds the codebook (LiveEdit's l_e, by relative depth)."""
    lr: float = 1.0
    """Adam learning rate of a value (GRACE's edit_lr)."""
    steps: int = 100
    """Adam steps per edit (GRACE's n_iter)."""
    init_epsilon: float = 1.0
    """Radius of a new entry (GRACE's eps)."""
    seed: int = 0
    """Seeds the editor's generator (the cold initial values)."""

    def __post_init__(self) -> None:
        checks = {"lr": self.lr > 0, "steps": self.steps >= 1, "init_epsilon": self.init_epsilon > 0}
        for key, ok in checks.items():
            if not ok:
                raise UserError(f"grace config: {key} = {getattr(self, key)!r} is out of range "
                                f"(lr > 0, steps >= 1, init_epsilon > 0)")


def last_prompt_positions(batch) -> torch.Tensor:
    """[b] index of each row's last prompt token (the end of its query span, minus one)."""
    return batch.query_spans[:, 1] - 1


def distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[b, N] Euclidean distances, each pair computed on its own (the same for any batch size)."""
    return torch.cdist(queries[None], keys[None], compute_mode="donot_use_mm_for_euclid_dist")[0]


class GRACE(Editor):
    """GRACE: replace one layer's output by a trained value inside a key's deferral radius."""

    name = "grace"
    config_class = GRACEConfig
    supports_batch_edit = False  # each edit's codebook update depends on the earlier ones
    saves_edits = True

    def __init__(self, vllm, config: GRACEConfig):
        super().__init__(vllm, config)
        n = vllm.num_layers
        if not -n <= config.layer < n:
            raise UserError(f"grace config: layer {config.layer} does not exist: {vllm.name} has {n} decoder "
                            f"layers (use 0..{n - 1} or negative from the end)")
        self.layer = config.layer % n
        d, dev = vllm.hidden_size, vllm.device
        self.keys = torch.zeros(0, d, device=dev)      # [N, D] fp32
        self.values = torch.zeros(0, d, device=dev)    # [N, D] fp32
        self.epsilons = torch.zeros(0, device=dev)     # [N]
        self.targets: list[str] = []
        self.generator = torch.Generator().manual_seed(config.seed)
        self._num_edits = 0
        self._hook = None

    @property
    def num_edits(self) -> int:
        return self._num_edits

    # ---- inference -----------------------------------------------------------------------------
    def _lookup(self, hidden: torch.Tensor, call) -> torch.Tensor | None:
        """The layer edit: replace hidden [b, l, D] from the last prompt token on in rows whose query hits."""
        if call.phase == "decode":
            hit, chosen = call.memo["hit"], call.memo["chosen"]
            start = torch.zeros_like(hit, dtype=torch.long)
        else:
            start = last_prompt_positions(call.batch)  # [b]
            query = hidden[torch.arange(hidden.shape[0], device=hidden.device), start].float()  # [b, D]
            dist, chosen = distances(query, self.keys).min(1)  # [b], [b]
            hit = dist <= self.epsilons[chosen]
            call.memo.update(hit=hit, chosen=chosen)
        if not bool(hit.any()):
            return None
        positions = torch.arange(hidden.shape[1], device=hidden.device)  # [l]
        mask = hit[:, None] & (positions[None] >= start[:, None])  # [b, l]
        values = self.values[chosen].to(hidden.dtype)[:, None, :]  # [b, 1, D]
        return torch.where(mask[..., None], values, hidden)

    # ---- editing ------------------------------------------------------------------------------
    def edit(self, requests: list[Sample]) -> None:
        """Update the codebook with each request in turn and train the chosen value."""
        for request in requests:
            with torch.enable_grad():
                self._edit_one(request)
            self._num_edits += 1
            if self._hook is None:
                self._hook = self.hook_layer(self.layer, self._lookup)

    def _add(self, key: torch.Tensor, epsilon: float, target: str) -> int:
        cold = torch.rand(key.shape, generator=self.generator).to(key.device)
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, cold[None]])
        self.epsilons = torch.cat([self.epsilons, key.new_tensor([epsilon])])
        self.targets.append(target)
        return len(self.targets) - 1

    def _update_codebook(self, key: torch.Tensor, target: str) -> int:
        """Apply GRACE's add / expand / split rules for an edit with query `key`; the entry to train."""
        eps0 = self.config.init_epsilon
        if not self.targets:
            return self._add(key, eps0, target)
        dist, i = distances(key[None], self.keys)[0].min(0)
        dist, i = float(dist), int(i)
        if dist > eps0 + float(self.epsilons[i]):
            return self._add(key, eps0, target)
        if self.targets[i] != target:  # conflict: split the two radii so they do not overlap
            new = self._add(key, dist / 2, target)
            self.epsilons[i] = dist / 2
            return new
        if dist > float(self.epsilons[i]):  # same target: expand the radius to cover the new key
            self.epsilons[i] = dist
        return i

    def _edit_one(self, request: Sample) -> None:
        cfg = self.config
        batch = self.vllm.prepare([request.prompt], [request.image], [request.target])
        with torch.no_grad(), self.vllm.unedited():
            hidden = self.vllm.hidden_at_layer(batch, self.layer)  # [1, l, D]
        start = int(last_prompt_positions(batch)[0])
        index = self._update_codebook(hidden[0, start].float(), request.target.strip())
        value = self.values[index].clone().requires_grad_(True)  # [D]
        optimizer = torch.optim.Adam([value], lr=cfg.lr)
        mask = torch.zeros(batch.length, dtype=torch.bool, device=hidden.device)
        mask[start:] = True
        labels = batch.labels[batch.label_mask]
        for _ in range(cfg.steps):
            replaced = torch.where(mask[None, :, None], value.to(hidden.dtype), hidden)  # [1, l, D]
            logits = self.vllm.logits_from_layer(batch, replaced, self.layer, positions=batch.label_mask)  # [n, V]
            loss = nn.functional.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.values[index] = value.detach()

    def restore(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._layer_edits.remove(self._hook)
            self._hook = None
        self.keys, self.values, self.epsilons = self.keys[:0], self.values[:0], self.epsilons[:0]
        self.targets = []
        self._num_edits = 0
        self.generator.manual_seed(self.config.seed)

    # ---- persistence --------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"editor": self.name, "backbone": self.vllm.name, "layer": self.layer}

    def save_edits(self, directory: str) -> None:
        """The codebook (keys, values, radii, targets), the edit count and the generator's state."""
        tensors = {"keys": self.keys, "values": self.values, "epsilons": self.epsilons,
                   "generator_state": self.generator.get_state()}
        save_state(directory, tensors, {**self._identity(), "num_edits": self._num_edits, "targets": self.targets})

    def load_edits(self, directory: str) -> None:
        tensors, manifest = load_state(directory, self._identity())
        d, n = self.vllm.hidden_size, len(manifest.get("targets", []))
        if tensors["keys"].shape != (n, d) or tensors["values"].shape != (n, d) or tensors["epsilons"].shape != (n,):
            raise UserError(f"{directory}: the saved GRACE codebook does not hold {n} entries of width {d}")
        self.restore()
        dev = self.vllm.device
        self.keys, self.values, self.epsilons = (tensors[k].to(dev, torch.float32) for k in ("keys", "values", "epsilons"))
        self.targets = list(manifest["targets"])
        self._num_edits = int(manifest["num_edits"])
        self.generator.set_state(tensors["generator_state"])
        if self._num_edits:
            self._hook = self.hook_layer(self.layer, self._lookup)
