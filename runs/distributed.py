"""torchrun plumbing for training and evaluation: join the process group, agree, fail loudly.

    group, device = setup("cuda", timeout_s=None)   # torchrun's env vars; Group() when not launched
    run_dir = on_main(group, lambda: make_run_dir(...), "creating the run folder")  # rank 0 makes, all get it
    ...
    shutdown(group)

`setup` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
joins with NCCL when the device is CUDA (each rank then uses cuda:LOCAL_RANK) and gloo otherwise.
Without those variables, or with WORLD_SIZE 1, nothing is initialised and every helper here is a
no-op, so one process runs exactly as before.

Every collective runs under a timeout (`--dist_timeout`, else the environment variable
LIVEEDIT_DIST_TIMEOUT, else 600 s): a rank that died or hangs makes the others fail with a
`PeerFailure` naming this rank and what it was waiting for, never an endless wait.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from utils.devices import parse_device_map
from utils.distributed import StepTotals, process_group_active
from utils.errors import UserError

ENV_TIMEOUT = "LIVEEDIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
T = TypeVar("T")


class PeerFailure(UserError):
    """A collective failed or timed out: another rank stopped, crashed or hangs (its own error says why)."""


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank `rank` of `world` (one process: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    owned: bool = False          # True when `setup` initialised the process group (and `shutdown` ends it)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world}"


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"the environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def rank_prefix() -> str:
    """'rank R of N: ' under torchrun (for one-line error messages), '' in one process."""
    world = launched_world_size()
    return f"rank {os.environ.get('RANK', '?')} of {world}: " if world > 1 else ""


def timeout_seconds(flag_value: float | None) -> float:
    """The collective timeout: the flag, else LIVEEDIT_DIST_TIMEOUT, else 600 s."""
    if flag_value is not None:
        return float(flag_value)
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise UserError(f"{ENV_TIMEOUT} must be a positive number of seconds, got {raw!r}")
    return value


def _is_cuda(device: str) -> bool:
    name = str(device).strip().lower()
    return name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())


def check_device_map(device_map: str | None) -> None:
    """`--device_map` spreads ONE process's backbone over its GPUs; torchrun gives each rank one GPU, so the two
    do not combine (a UserError before any process group is joined)."""
    if launched_world_size() > 1 and parse_device_map(device_map) is not None:
        raise UserError(f"--device_map {device_map} cannot be combined with torchrun (each rank uses one GPU, "
                        f"cuda:LOCAL_RANK): run one process with --device_map, or torchrun without it")


def setup(device: str, timeout_s: float | None = None) -> tuple[Group, str]:
    """Join torchrun's process group when launched by it with WORLD_SIZE > 1.

    Returns the group and the device this rank uses: `device` itself, except that a CUDA device
    becomes cuda:LOCAL_RANK (one GPU per rank). A group already initialised by the caller is used
    as it is (and left to the caller to end).
    """
    timeout = timeout_seconds(timeout_s)
    if not process_group_active() and launched_world_size() <= 1:
        return Group(timeout_s=timeout), device
    owned = False
    cuda = _is_cuda(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not process_group_active():
        backend = "nccl" if cuda else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as exc:
            raise PeerFailure(f"{rank_prefix()}joining the process group ({backend}, MASTER_ADDR="
                              f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}) failed "
                              f"within {timeout:.0f} s: {_first_line(exc)}") from exc
        owned = True
    return Group(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), timeout, owned), device


def shutdown(group: Group) -> None:
    """End the process group if `setup` started it."""
    if group.owned and process_group_active():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@contextlib.contextmanager
def collective(group: Group, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a `PeerFailure` naming this rank and `what`."""
    try:
        yield
    except PeerFailure:
        raise
    except (RuntimeError, dist.DistError) as exc:
        raise PeerFailure(
            f"{group.label}: {what} failed: another rank stopped, crashed or did not answer within "
            f"{group.timeout_s:.0f} s (--dist_timeout / {ENV_TIMEOUT}); that rank's own error is printed above "
            f"and torchrun's summary names it ({_first_line(exc)})") from exc


def broadcast(group: Group, value: T, what: str) -> T:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not group.distributed:
        return value
    box = [value]
    with collective(group, what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(group: Group, fn: Callable[[], T], what: str) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank.

    A `UserError` on rank 0 is raised on every rank with the same message; any other exception
    is raised on rank 0, and the others raise a `PeerFailure` saying rank 0 failed at `what`.
    """
    if not group.distributed:
        return fn()
    outcome: tuple[str, object] = ("ok", None)
    error: BaseException | None = None
    if group.is_main:
        try:
            outcome = ("ok", fn())
        except UserError as exc:
            outcome, error = ("user", str(exc)), exc
        except Exception as exc:  # noqa: BLE001 - re-raised below on rank 0
            outcome, error = ("failed", _first_line(exc)), exc
    kind, value = broadcast(group, outcome, what)
    if error is not None:
        raise error
    if kind == "user":
        raise UserError(str(value))
    if kind == "failed":
        raise PeerFailure(f"{group.label}: rank 0 failed while {what} ({value}); see its error above")
    return value  # type: ignore[return-value]


def barrier(group: Group, what: str) -> None:
    if group.distributed:
        with collective(group, what):
            dist.barrier()


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """The exception a rank raises when the ranks agreed to stop on `signum`."""
    from runs.signals import Terminated

    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _stop_votes(requested: list[int], device: torch.device) -> torch.Tensor:
    """This rank's stop requests as [SIGINT asked, SIGTERM asked] (0 / 1 each), summed over ranks with the gradients."""
    asked = {int(s) for s in requested}
    return torch.tensor([float(signal.SIGINT in asked), float(signal.SIGTERM in asked)], device=device)  # [2] float32


def _agreed_signal(votes: torch.Tensor) -> int:
    """[SIGINT votes, SIGTERM votes] summed over ranks -> the signal every rank stops with (0: none)."""
    sigint, sigterm = votes.tolist()
    return int(signal.SIGTERM) if sigterm > 0 else int(signal.SIGINT) if sigint > 0 else 0


def sum_gradients(group: Group, params: list[torch.nn.Parameter], step: int, logs: object = None,
                  requested: list[int] | None = None) -> int:
    """Replace each gradient by its sum over ranks: one all-reduce per gradient dtype and device (one in practice).

    The float32 all-reduce also carries the ranks' stop requests (`requested`: the signals this rank
    noted) and, when `logs` is a `StepTotals`, the step's logged shares (their sums are set on it): no
    collective of their own. Returns the signal every rank agreed to stop with after this step (0:
    none; SIGTERM wins over SIGINT). Every rank runs the same graph, so the same parameters have
    gradients on every rank. One process: nothing to do, returns 0.
    """
    if not group.distributed:
        return 0
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    scalars_key = next((key for key in buckets if key[0] == torch.float32), None)
    if scalars_key is None:  # no float32 gradient: the scalars travel alone
        scalars_key = (torch.float32, next(iter(buckets))[1] if buckets else torch.device("cpu"))
        buckets[scalars_key] = []
    shares = logs.pending() if isinstance(logs, StepTotals) and not logs.summed else None
    scalars = [_stop_votes(requested or [], scalars_key[1])] + ([shares.to(scalars_key[1])] if shares is not None else [])
    signum = 0
    with collective(group, f"summing the gradients of step {step}"):
        for key, grads in buckets.items():  # insertion order: the same on every rank
            tail = scalars if key == scalars_key else []
            flat = torch.cat([g.reshape(-1) for g in grads] + tail)  # [sum of numels (+ 2 votes + k shares)]
            dist.all_reduce(flat)
            parts = flat.split([g.numel() for g in grads] + [t.numel() for t in tail])
            for g, part in zip(grads, parts):
                g.copy_(part.view_as(g))
            if tail:
                signum = _agreed_signal(parts[len(grads)])
                if shares is not None:
                    logs.set_sums(parts[len(grads) + 1])  # type: ignore[union-attr]
    return signum


def broadcast_parameters(group: Group, params: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's parameters to every rank (they start equal already; this guards against any drift)."""
    if not group.distributed:
        return
    with collective(group, "copying rank 0's parameters"), torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


__all__ = ["Group", "PeerFailure", "setup", "shutdown", "collective", "broadcast", "on_main", "barrier",
           "interrupt_for", "sum_gradients", "broadcast_parameters", "timeout_seconds",
           "rank_prefix", "launched_world_size", "ENV_TIMEOUT", "DEFAULT_TIMEOUT_S"]
