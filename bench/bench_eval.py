"""Benchmark: sequential-evaluation scoring throughput at eval batch 1 vs batched, in one run.

Runs the same evaluation (tiny backbone, generated toy world, FT-L or a no-op editor) twice,
with `--eval_batch_size` 1 and then B, and prints one JSON line per setting plus their ratio:
    {"what": "eval_records_per_s", "batch_size": 1, ...}
    {"what": "eval_records_per_s", "batch_size": 16, ...}
    {"what": "eval_batched_speedup", "value": ...}
records/s counts scoring only (teacher forcing + exact-match generation of every sample of the
scored records); editing is timed separately. Also checks that both runs gave the same numbers.

    python bench/bench_eval.py --quick          # < 1 minute on a laptop CPU
    python bench/bench_eval.py --model tiny-blip2 --records 128 --editor noop
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from editors.base import Editor  # noqa: E402
from runs.evaluation import EvalConfig, evaluate  # noqa: E402
from runs.results import round_floats  # noqa: E402


class NoOpEditor(Editor):
    """Changes nothing: isolates the cost of scoring."""

    name = "noop"

    def __init__(self, vllm, config=None):
        super().__init__(vllm, config)
        self._n = 0

    @property
    def num_edits(self) -> int:
        return self._n

    def edit(self, requests) -> None:
        self._n += len(requests)

    def restore(self) -> None:
        self._n = 0


def build(args):
    from editors import load_editor
    from editors.vllms import load_vllm
    from utils.data import load_edit_dataset
    from toyworld.world import generate_toyworld

    world = os.path.join(args.workdir, "toyworld")
    generate_toyworld(world, n_train=2, n_eval=args.records, n_pretrain_scenes=2)
    records = load_edit_dataset("TOY", os.path.join(world, "eval.json"), world)
    vllm = load_vllm(args.model, device=args.device)
    editor = NoOpEditor(vllm) if args.editor == "noop" else load_editor(args.editor, vllm)
    return editor, records


def measure(editor, records, args, batch_size: int) -> tuple[dict, list]:
    cfg = EvalConfig(sequential_edit_n=args.sen, data_name="TOY",
                     results_dir=os.path.join(args.workdir, f"b{batch_size}"), batch_size=batch_size,
                     exact_match=not args.no_exact_match, show_progress=False, tensorboard=False, plot=False)
    start = time.perf_counter()
    outcome = evaluate(editor, records, cfg)
    wall = time.perf_counter() - start
    run = outcome.run
    line = {"what": "eval_records_per_s", "batch_size": batch_size, "records_per_s": run["records_per_s"],
            "samples_per_s": run["samples_per_s"], "scoring_time_s": run["scoring_time_s"],
            "edit_time_s": run["total_edit_time_s"], "wall_s": wall, "records": len(records),
            "model": editor.vllm.name, "editor": editor.name, "device": run["device"],
            "exact_match": cfg.exact_match, "threads": torch.get_num_threads()}
    return round_floats(line), _numbers(outcome)


def _numbers(outcome) -> list:
    """Everything but timings, to check that batching changed nothing."""
    return [{k: v for k, v in m.items() if k != "reliability"} | {"rel": m.get("reliability", {}).get("acc")}
            for m in outcome.split_mean]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="16 records (< 1 minute)")
    p.add_argument("--model", default="tiny-llava")
    p.add_argument("--editor", default="ft_l", choices=("ft_l", "ft_m", "noop"))
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--sen", type=int, default=8, help="edits per chunk")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: stable timings of tiny models on shared CPUs; 0 = torch default)")
    p.add_argument("--no_exact_match", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.records = 16
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        editor, records = build(args)
        single, numbers_1 = measure(editor, records, args, 1)
        print(json.dumps(single), flush=True)
        batched, numbers_b = measure(editor, records, args, args.batch_size)
        print(json.dumps(batched), flush=True)
    speedup = batched["records_per_s"] / single["records_per_s"]
    print(json.dumps({"what": "eval_batched_speedup", "value": round(speedup, 2),
                      "batch_sizes": [1, args.batch_size], "same_numbers": numbers_1 == numbers_b,
                      "model": single["model"], "editor": single["editor"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
