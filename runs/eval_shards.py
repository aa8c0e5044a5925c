"""Sequential evaluation under torchrun: chunk k runs on rank k mod N, rank 0 merges the files.

    torchrun --standalone --nproc_per_node 4 test_vllm_edit.py -en liveedit -mn blip2 -sen 1000 -dn EVQA -ckpt ...

The chunks of the sequential protocol are independent (each starts from the unedited model), so
sharding them changes no number: the result files are those of one process.
1. Rank 0 takes the results folder's lock (held to the end; the other ranks take none), applies
   --overwrite, checks or writes the run identity, removes failure notes of an earlier run, and
   lists the unfinished chunks; every rank waits for that (one broadcast, under --dist_timeout).
2. Each rank runs its unfinished chunks (k % N == rank) and writes `progress/chunk_<k>.json`
   itself, atomically, so a chunk file exists only once complete. A rank that fails writes
   `progress/failed_rank_<r>.json` (its error) before it exits.
3. Rank 0, after its own chunks, waits for every chunk file (a failure note ends the wait with a
   `PeerFailure` naming that rank), logs the other ranks' chunks to TensorBoard and writes the
   final files. A rerun, with any number of ranks or one process, reuses every finished chunk.

Lifelong mode is one stream of edits that is never restored: rank 0 runs it alone (as one process
would) and the other ranks return at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Sequence

from tqdm.auto import tqdm

from utils.errors import UserError
from utils.io import write_json_atomic
from utils.memory import reset_peak
from utils.records import EditRecord

from runs import distributed
from runs.eval_config import EvalConfig
from runs.evaluation import (EvalOutcome, Progress, _chunk, _finalize, _Run, evaluate, run_folder, run_identity,
                             split_into_chunks)
from runs.results import ScalarLog

POLL_S = 0.2  # how often rank 0 looks for the other ranks' chunk files


def failure_path(progress: Progress, rank: int) -> str:
    return progress.path(f"failed_rank_{rank}.json")


def evaluate_sharded(editor, records: Sequence[EditRecord], cfg: EvalConfig,
                     group: distributed.Group) -> EvalOutcome | None:
    """`evaluate` over the ranks of `group`; rank 0 returns the outcome, the others None."""
    if cfg.lifelong:
        if group.is_main:
            return evaluate(editor, records, cfg)
        print(f"{group.label}: --lifelong is one stream of edits, rank 0 runs it alone; this rank has nothing to do",
              file=sys.stderr)
        return None
    if not records:
        raise UserError("no records to evaluate (check the dataset and -dsn)")
    editor_name = cfg.editor_name or editor.name
    model_name = cfg.model_name or editor.vllm.name
    progress = Progress(run_folder(cfg, editor_name, model_name))
    config = dataclasses.asdict(cfg) | {"device": str(editor.vllm.device), "world_size": group.world}
    chunks = split_into_chunks(records, cfg.sequential_edit_n, keep_partial=cfg.keep_partial_chunk)
    held = contextlib.ExitStack()  # rank 0's lock on the results folder, to the end

    def prepare() -> list[int]:  # rank 0: lock, identity, the chunks left to run
        held.enter_context(progress.lock())
        if cfg.overwrite:
            progress.clear()
        progress.start(run_identity(cfg, editor, records, editor_name, model_name), config)
        for r in range(group.world):
            if os.path.isfile(failure_path(progress, r)):
                os.remove(failure_path(progress, r))
        return [k for k in range(len(chunks)) if not os.path.isfile(progress.chunk_path(k))]

    with held:
        todo = distributed.on_main(group, prepare, "taking the results folder")
        mine = [k for k in todo if k % group.world == group.rank]
        run = _Run(editor, records, dataclasses.replace(cfg, show_progress=cfg.show_progress and group.is_main),
                   chunks, progress, ScalarLog(progress.folder, cfg.tensorboard and group.is_main and bool(todo)),
                   config=config)
        try:
            _run_mine(run, mine, group)
            if not group.is_main:
                return None
            _wait_for(progress, [k for k in todo if k not in mine], group)
            for k in todo:
                if k not in mine:
                    summary = progress.read(progress.chunk_path(k))
                    run.log.log(summary["mean"], k + 1)
                    run.log.log(summary.get("routing") or {}, k + 1, prefix="routing/")
        finally:
            run.log.close()
        return _finalize(run, progress.folder, chunks_run=len(todo), chunks_resumed=len(chunks) - len(todo))


def _run_mine(run: _Run, mine: list[int], group: distributed.Group) -> None:
    """This rank's chunks; on any failure, a note for rank 0 first."""
    editor = run.editor
    editor.restore()
    reset_peak(editor.vllm.device)
    bar = tqdm(total=len(mine), desc=f"chunks (rank {group.rank})", unit="chunk", disable=not run.cfg.show_progress)
    try:
        for k in mine:
            summary = _chunk(run, k)
            write_json_atomic(run.progress.chunk_path(k), summary, indent=None)
            run.log.log(summary["mean"], k + 1)
            run.log.log(summary.get("routing") or {}, k + 1, prefix="routing/")
            bar.update(1)
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        write_json_atomic(failure_path(run.progress, group.rank), {"rank": group.rank, "error": text})
        raise
    finally:
        bar.close()
        editor.restore()


def _wait_for(progress: Progress, chunks: list[int], group: distributed.Group) -> None:
    """Rank 0: wait until the other ranks' chunk files exist; a failure note of a rank ends the wait."""
    waiting = list(chunks)
    while True:
        waiting = [k for k in waiting if not os.path.isfile(progress.chunk_path(k))]
        if not waiting:
            return
        for r in range(1, group.world):
            path = failure_path(progress, r)
            if os.path.isfile(path):
                error = progress.read(path).get("error", "?")
                raise distributed.PeerFailure(
                    f"rank {r} of {group.world} failed ({error}); chunks {waiting} are unfinished. The finished "
                    f"chunks are kept: fix the cause and rerun the same command (any number of ranks) to resume")
        time.sleep(POLL_S)


__all__ = ["evaluate_sharded", "failure_path"]
