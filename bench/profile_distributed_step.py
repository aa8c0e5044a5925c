"""Where a LiveEdit training step's time goes, per process: run it as train_vllm_editor.py is run.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/profile_distributed_step.py <train_vllm_editor.py flags>
    OMP_NUM_THREADS=1 python bench/profile_distributed_step.py <the same flags>          # one process

Wraps, in this process only, the trainer's phases and every torch.distributed collective with timers
(the real functions still run), trains with the given flags, and prints one JSON line per rank:
wall-clock and CPU ms per step of each phase (data preparation, the editor's forward + backward,
the gradient sum, the optimizer, TensorBoard, checkpoints), the whole step (`step_wall_ms`,
`step_cpu_ms`: this process's CPU time, which does not depend on how loaded the machine is), and per
collective its calls per step, mean size and wall ms per step. Steps 1-2 (warm-up) are left out.
`bench/bench_distributed.py --split` runs it for both settings.
`PROFILE_OPS=1` also prints rank 0's torch.profiler table of the last step.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WARMUP = 2
_wall: dict[str, float] = collections.defaultdict(float)    # phase -> wall ms over the timed steps
_cpu: dict[str, float] = collections.defaultdict(float)     # phase -> this process's CPU ms over the timed steps
_coll: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])  # name -> [calls, bytes, wall ms]
_state: dict = {"step": 0, "start": None, "end": None}


def _counting() -> bool:
    return _state["step"] > WARMUP


def _timed(name, fn):
    """fn, adding its wall and CPU time to phase `name` during timed steps."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            if _counting():
                _wall[name] += (time.perf_counter() - t) * 1e3
                _cpu[name] += (time.process_time() - c) * 1e3
    return wrapper


def _timed_collective(name, fn):
    """A torch.distributed collective, counting its calls, the bytes this rank contributes and its wall time."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if _counting():
                sent = args[1] if name == "all_gather" else args[0]
                entry = _coll[name]
                entry[0] += 1
                entry[1] += sent.element_size() * sent.numel() if hasattr(sent, "numel") else 0
                entry[2] += (time.perf_counter() - t) * 1e3
    return wrapper


def _instrument() -> None:
    import torch.distributed as dist
    import torch.optim

    import runs.training as training
    from editors.liveedit.editor import LiveEdit
    from runs import distributed

    for name in ("all_gather", "all_reduce", "broadcast", "barrier", "broadcast_object_list"):
        setattr(dist, name, _timed_collective(name, getattr(dist, name)))
    trainer = training.Trainer
    make_batch, train_one = trainer.make_batch, trainer.train_one

    def timed_make_batch(self, step):
        _state["step"] = step
        if step == WARMUP + 1:
            _state["start"] = (time.perf_counter(), time.process_time())
        return _timed("data preparation", make_batch)(self, step)

    def timed_train_one(self, step, batch):
        _state["step"] = step
        if os.environ.get("PROFILE_OPS") and _counting():
            from torch.profiler import profile
            with profile() as prof:
                out = _timed("train_one: all but the data", train_one)(self, step, batch)
            _state["ops"] = prof.key_averages()
        else:
            out = _timed("train_one: all but the data", train_one)(self, step, batch)
        if _counting():
            _state["end"] = (time.perf_counter(), time.process_time())
        return out

    trainer.make_batch, trainer.train_one = timed_make_batch, timed_train_one
    trainer.write_logs = _timed("tensorboard", trainer.write_logs)
    trainer.save = _timed("checkpoint", trainer.save)
    trainer._non_finite_gradients = _timed("finite check", trainer._non_finite_gradients)
    distributed.sum_gradients = _timed("gradient sum", distributed.sum_gradients)
    LiveEdit.train_step = _timed("editor forward+backward", LiveEdit.train_step)
    torch.optim.Adam.step = _timed("optimizer", torch.optim.Adam.step)


def main() -> None:
    _instrument()
    import train_vllm_editor

    code = train_vllm_editor.main(sys.argv[1:])
    steps = max(_state["step"] - WARMUP, 1)
    (t0, c0), (t1, c1) = _state["start"] or (0, 0), _state["end"] or (0, 0)
    rank = int(os.environ.get("RANK", "0"))
    print(json.dumps({
        "what": "train_step_split", "rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "steps_timed": steps,
        "step_wall_ms": round((t1 - t0) * 1e3 / steps, 2), "step_cpu_ms": round((c1 - c0) * 1e3 / steps, 2),
        "wall_ms": {k: round(v / steps, 2) for k, v in _wall.items()},
        "cpu_ms": {k: round(v / steps, 2) for k, v in _cpu.items()},
        "collectives": {k: {"per_step": round(n / steps, 2), "kB": round(b / max(n, 1) / 1e3, 1),
                            "wall_ms": round(ms / steps, 2)} for k, (n, b, ms) in _coll.items()}}), flush=True)
    if _state.get("ops") is not None and rank == 0:
        print(_state["ops"].table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
