"""WISE's side memory: k knowledge shards with random gradient masks, merged by Ties-Merge.

Everything is kept as a delta from the main memory W_v (the frozen value matrix), float32:
- `base`: the side memory W_v' − W_v that the current round of shards started from (zero at first);
- `shards[i]`: shard i's copy W_v'^i − W_v (None while it holds no edit: it equals `base`);
- `masks[i]`: its random gradient mask (each entry on with probability ρ, drawn from the editor's
  seeded generator), so shard i's edits only touch that subset of the parameters;
- `effective`: what inference uses: base + Ties({shard_i − base}) over the shards holding edits.
Shard `current` takes the edits until it holds `shard_size`; then the next one; when all k are full
the merge is committed (base <- effective), the shards restart from it with fresh masks (paper,
Algorithm 1). `eps` is the smallest activation score of any edit (Algorithm 1, line 4).
"""
from __future__ import annotations

import math

import torch


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Ties step 1: keep the `density` fraction of `tau`'s entries with the largest magnitude."""
    keep = math.ceil(density * tau.numel())
    if int((tau != 0).sum()) <= keep:
        return tau
    threshold = tau.abs().flatten().kthvalue(tau.numel() - keep + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ties_merge(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """Ties-Merge of task vectors: trim each, elect a sign per entry (sign of the summed mass), and
    average per entry only the trimmed values that carry the elected sign (disjoint mean).

    The paper's merge weights are equal (λ = 1/k), so they cancel in the disjoint mean."""
    stacked = torch.stack([trim(t, density) for t in taus])  # [k, ...]
    sign = torch.sign(stacked.sum(0))                        # elected sign per entry
    agree = (torch.sign(stacked) == sign) & (stacked != 0)   # [k, ...]
    count = agree.sum(0)
    total = (stacked * agree).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


class SideMemory:
    """State of WISE's side memory (deltas from the main memory, on `device`, float32)."""

    def __init__(self, shape: tuple[int, int], num_shards: int, mask_ratio: float, shard_size: int,
                 density: float, generator: torch.Generator, device):
        self.shape, self.k, self.rho = shape, num_shards, mask_ratio
        self.shard_size, self.density = shard_size, density
        self.gen, self.device = generator, device
        self.reset()

    def reset(self, masks: list[torch.Tensor] | None = None) -> None:
        """No edits; the first round's masks are `masks` (the ones drawn first, reused by `restore`)."""
        self.base: torch.Tensor | None = None
        self.effective: torch.Tensor | None = None
        self.eps = math.inf
        self.num_edits = 0
        self.new_round(masks)

    def new_round(self, masks: list[torch.Tensor] | None = None) -> None:
        """Empty shards with fresh random masks (drawn on the CPU: the same on every device)."""
        self.shards: list[torch.Tensor | None] = [None] * self.k
        self.fill = [0] * self.k
        self.current = 0
        self.masks = masks if masks is not None else [
            (torch.rand(self.shape, generator=self.gen) < self.rho).to(self.device) for _ in range(self.k)]

    def start(self) -> torch.Tensor:
        """A trainable copy of the current shard (its side memory so far) [D, I]."""
        init = self.shards[self.current]
        if init is None:
            init = self.base if self.base is not None else torch.zeros(self.shape, device=self.device)
        return init.detach().clone()

    def store(self, delta: torch.Tensor, score: float) -> None:
        """Keep the current shard's trained `delta` after one edit whose activation score is `score`."""
        self.shards[self.current] = delta.detach()
        self.fill[self.current] += 1
        self.num_edits += 1
        self.eps = min(self.eps, score)
        self.effective = self.merged()
        if self.fill[self.current] >= self.shard_size:
            self.current += 1
            if self.current == self.k:  # every shard is full: commit the merge, start a new round
                self.base = self.effective
                self.new_round()

    def merged(self) -> torch.Tensor:
        base = self.base if self.base is not None else torch.zeros(self.shape, device=self.device)
        taus = [s - base for s in self.shards if s is not None]
        return base + ties_merge(taus, self.density) if taus else base

    # ---- persistence ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"mask.{i}": m.to(torch.uint8).cpu() for i, m in enumerate(self.masks)}
        out |= {f"shard.{i}": s.cpu() for i, s in enumerate(self.shards) if s is not None}
        if self.base is not None:
            out["base"] = self.base.cpu()
        return out

    def state(self) -> dict:
        return {"fill": self.fill, "current": self.current, "eps": self.eps if math.isfinite(self.eps) else None,
                "num_edits": self.num_edits}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.masks = [tensors[f"mask.{i}"].to(self.device).bool() for i in range(self.k)]
        self.shards = [tensors[f"shard.{i}"].to(self.device) if f"shard.{i}" in tensors else None
                       for i in range(self.k)]
        self.base = tensors["base"].to(self.device) if "base" in tensors else None
        self.fill, self.current = list(state["fill"]), int(state["current"])
        self.eps = math.inf if state["eps"] is None else float(state["eps"])
        self.num_edits = int(state["num_edits"])
        self.effective = self.merged() if self.num_edits else None
