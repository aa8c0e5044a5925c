"""Which rows of a global training batch this process computes, and the collectives a sharded loss needs.

Under torchrun (a default process group of N > 1 ranks) a trainable editor that says
`supports_sharded_training` gets the WHOLE global batch of B records and the step's rng, draws every
random choice for all B records (so the choices are those of one process), and computes only its
`Shard` of rows; losses that look at other rows (in-batch negatives, the experts of all C = B
edits) `gather` them from the other ranks WITH gradients. Each rank's loss is its share: the sum
over ranks is the one-process loss, so summing the gradients over ranks gives the one-process
gradient.

In one process (no process group, or a group of one) every method here is the identity, `mean` is
`Tensor.mean` and `totals` is `.item()`: the arithmetic is exactly the one-process arithmetic.

Rows are split in contiguous blocks as evenly as possible (rank r gets rows start..stop-1). A
rank with fewer rows than the widest (the smaller last batch of an epoch) repeats its last row
(row 0 when it has none) up to `width` rows, so that every rank gathers tensors of the same shape;
the repeated rows are dropped by `gather` and `mean`, so they change nothing.

Fixed cost per step, sharded: every collective is a round trip between the ranks, which at small
shapes costs more than the data it moves, so a step makes few of them. `gather_rows` gathers any
number of per-row tensors in ONE all_gather (its backward is ONE all-reduce), and `totals` does not
reduce at once: it returns `StepTotals`, which the trainer sums over ranks in the same all-reduce as
the gradients (`runs/distributed.py:sum_gradients`); read before that, it reduces on its own.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


def process_group_active() -> bool:
    """True inside an initialised default process group (torchrun, or a test's own)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if process_group_active() else 1


def rank() -> int:
    return dist.get_rank() if process_group_active() else 0


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums, over ranks, the gradients of each rank's copy of a part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        stacked = torch.stack(grads)  # [world, ...] this rank's gradient of every part
        dist.all_reduce(stacked)      # summed over ranks
        return stacked[rank()]


def all_gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `x` (same shape on all ranks), in rank order; the gradient flows back to each
    rank's own `x` as the sum over ranks of the gradients of its copy."""
    return list(_AllGather.apply(x.contiguous()))


@dataclass(frozen=True)
class Shard:
    """This process's rows of a global batch of `total` rows (rank `rank` of `world`)."""

    total: int
    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, total: int) -> "Shard":
        """The shard of the current process group (one process: all rows)."""
        return cls(total, rank(), world_size())

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def sizes(self) -> list[int]:
        """Real rows per rank: contiguous blocks, the first `total % world` ranks one row more."""
        base, extra = divmod(self.total, self.world)
        return [base + (r < extra) for r in range(self.world)]

    @property
    def start(self) -> int:
        return sum(self.sizes[:self.rank])

    @property
    def size(self) -> int:
        """Real rows of this rank (0 when the batch has fewer rows than ranks)."""
        return self.sizes[self.rank]

    @property
    def width(self) -> int:
        """Rows every rank computes (the real ones, then repeats)."""
        return max(self.sizes)

    def rows(self) -> list[int]:
        """Global row indices this rank computes: its real rows, then repeats of the last one."""
        real = list(range(self.start, self.start + self.size))
        return real + [real[-1] if real else 0] * (self.width - self.size)

    def diagonal(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(local row, global column) of each computed row's own entry in a [width, total] matrix."""
        local = torch.arange(self.width, device=device)  # [width]
        if not self.sharded:
            return local, torch.arange(self.total, device=device)
        return local, torch.tensor(self.rows(), device=device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows [width, ...] -> all real rows of the global batch [total, ...], with gradients."""
        if not self.sharded:
            return x
        parts = all_gather_with_grad(x.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, self.sizes)])  # [total, ...]

    def gather_rows(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`gather` of several tensors [width, ...] in one all_gather per dtype (one in practice):
        each x [width, ...] -> [total, ...], with gradients (one process: the tensors themselves)."""
        if not self.sharded:
            return xs
        out: list[torch.Tensor | None] = [None] * len(xs)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, x in enumerate(xs):
            by_dtype.setdefault(x.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = torch.cat([xs[i].reshape(self.width, -1) for i in indices], dim=1)  # [width, sum of row sizes]
            whole = self.gather(flat)  # [total, sum of row sizes]
            parts = whole.split([math.prod(xs[i].shape[1:]) for i in indices], dim=1)
            for i, part in zip(indices, parts):
                out[i] = part.reshape(self.total, *xs[i].shape[1:])  # [total, ...]
        return tuple(out)  # type: ignore[arg-type]

    def mean(self, per_row: torch.Tensor) -> torch.Tensor:
        """This rank's share of the mean over the global batch: per_row [width] -> a scalar whose sum
        over ranks is the global mean (one process: `per_row.mean()`)."""
        if not self.sharded:
            return per_row.mean()
        return per_row[:self.size].sum() / self.total

    def totals(self, shares: dict[str, torch.Tensor]) -> "dict[str, float] | StepTotals":
        """Scalars to log: each rank's shares summed over ranks, as floats (one process: `.item()`).
        Sharded, a `StepTotals` whose sum the trainer takes with the gradients' all-reduce."""
        if not self.sharded:
            return {name: value.item() for name, value in shares.items()}
        return StepTotals(shares)


class StepTotals(Mapping):
    """This rank's shares of a step's logged scalars; once summed over ranks, a mapping name -> float.

    The trainer appends `pending()` to the gradients' all-reduce and hands the sums back with
    `set_sums`; any other reader (a test calling `train_step` under a process group) makes it sum
    them with an all-reduce of its own at the first read.
    """

    def __init__(self, shares: dict[str, torch.Tensor]):
        self._names = list(shares)
        self._shares = torch.stack([value.detach().float().reshape(()) for value in shares.values()])  # [k]
        self._sums: dict[str, float] | None = None

    @property
    def summed(self) -> bool:
        return self._sums is not None

    def pending(self) -> torch.Tensor:
        """This rank's shares [k] (float32), in name order, to be summed over ranks."""
        return self._shares

    def set_sums(self, summed: torch.Tensor) -> None:
        """`summed` [k]: `pending()` summed over ranks."""
        self._sums = dict(zip(self._names, summed.tolist()))

    def _resolved(self) -> dict[str, float]:
        if self._sums is None:
            summed = self._shares.clone()
            dist.all_reduce(summed)
            self.set_sums(summed)
        return self._sums  # type: ignore[return-value]

    def __getitem__(self, name: str) -> float:
        return self._resolved()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


__all__ = ["Shard", "StepTotals", "all_gather_with_grad", "process_group_active", "rank", "world_size"]
