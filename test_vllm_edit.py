"""Evaluate sequential (or lifelong) editing of a VLLM with an editor (the paper's `test_vllm_edit.py`).

Example (the paper's README command keeps working):
    python test_vllm_edit.py -en liveedit -mn blip2 -sen 1000 -dvc cuda:0 -dn EVQA \
        -ckpt records/liveedit/blip2-opt-2.7b/EVQA/checkpoints/ckpt
On the embedded toy world, with no weights or data to download:
    python test_vllm_edit.py -en ft_l -mn tiny-llava -sen 10 -dn toy -dsn 50

Results go to `<results_dir>/<editor>/<model>/<DATA>[-postfix]/sequential_edit_<n>/` (see
`utils/evaluation.py`); rerunning the same command resumes after the last finished chunk.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils.errors import UserError  # noqa: E402

TABLE_ROWS = (("Rel", "reliability", None), ("T-Gen", "generality", "text_rephrase"),
              ("M-Gen", "generality", "image_rephrase"), ("T-Loc", "locality", "text_loc"),
              ("M-Loc", "locality", "image_loc"), ("Port", "portability", None))


def parse_ckpt(value: str | None) -> str | None:
    """`none` / `None` / empty mean no checkpoint."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate sequential knowledge editing of a vision-language model.")
    p.add_argument("-en", "--editor_name", required=True, help="editor, e.g. liveedit, ft_l, ft_m (any case)")
    p.add_argument("-mn", "--edit_model_name", required=True,
                   help="backbone: blip2 / llava / minigpt4 (or full names), or tiny-blip2 / tiny-llava / "
                        "tiny-minigpt4")
    p.add_argument("-sen", "--sequential_edit_n", type=int, required=True, help="edits per sequential chunk")
    p.add_argument("-enp", "--eval_name_postfix", default="", help="appended to the result folder name as -<postfix>")
    p.add_argument("-dvc", "--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("-ckpt", "--editor_ckpt_path", type=parse_ckpt, default=None,
                   help="trained editor checkpoint ('none' = no checkpoint)")
    p.add_argument("-dn", "--data_name", required=True, help="EVQA, EIC, VLKEB, VLKEB-ONEHOP or TOY (any case)")
    p.add_argument("-dsn", "--data_sample_n", type=int, default=None, help="evaluate only the first N records")
    p.add_argument("--model_path", default=None, help="local weight folder (else env var / configs/model_paths.yaml)")
    p.add_argument("--data_dir", default="data", help="folder holding easy-edit-mm/, VLKEB/, toyworld/")
    p.add_argument("--config", default=None, help="editor YAML (default: configs/<editor>/<model>.yaml)")
    p.add_argument("--eval_batch_size", type=int, default=16, help="samples per scoring forward pass")
    p.add_argument("--allow_untrained", action="store_true",
                   help="evaluate an editor that needs training without -ckpt (random modules)")
    p.add_argument("--lifelong", action="store_true",
                   help="never restore between chunks; report metrics after 1, 10, 100, ... edits")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results of this run and start over")
    p.add_argument("--exact_match", action=argparse.BooleanOptionalAction, default=True,
                   help="also score greedy generation by exact match (default on)")
    p.add_argument("--results_dir", default="eval_results", help="root folder of the results")
    p.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and the lifelong checkpoint sample")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.sequential_edit_n < 1:
        raise UserError(f"-sen/--sequential_edit_n must be at least 1, got {args.sequential_edit_n}")
    if args.eval_batch_size < 1:
        raise UserError(f"--eval_batch_size must be at least 1, got {args.eval_batch_size}")
    if args.data_sample_n is not None and args.data_sample_n < 1:
        raise UserError(f"-dsn/--data_sample_n must be at least 1, got {args.data_sample_n}")


def check_trained(editor_name: str, checkpoint: str | None, allow_untrained: bool) -> None:
    """Refuse an editor that needs training but has no checkpoint (W-6), before anything is loaded."""
    from editors import editor_class

    try:
        cls = editor_class(editor_name)
    except ImportError as exc:
        raise UserError(f"editor {editor_name!r} cannot be imported: {exc}") from exc
    if not getattr(cls, "needs_training", False) or checkpoint:
        return
    if not allow_untrained:
        raise UserError(f"editor {editor_name} needs training, but no checkpoint was given: pass "
                        f"-ckpt <path to a trained checkpoint>, or --allow_untrained to evaluate it with "
                        f"randomly initialised modules")
    print(f"warning: evaluating {editor_name} WITHOUT a checkpoint (randomly initialised modules)", file=sys.stderr)


def load_records(data_name: str, data_dir: str, limit: int | None):
    from utils.data import TOY, canonical_dataset_name, default_data_paths, ensure_toy_data, load_edit_dataset

    name = canonical_dataset_name(data_name)
    if name == TOY:
        ensure_toy_data(data_dir)
    json_path, image_root = default_data_paths(name, "eval", data_dir)
    return name, load_edit_dataset(name, json_path, image_root, limit=limit)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def format_table(total_mean: dict) -> str:
    """A small table of the mean accuracy / exact match per metric."""
    lines = [f"{'metric':<8}{'acc':>9}{'exact':>9}"]
    for label, group, kind in TABLE_ROWS:
        values = total_mean.get(group, {})
        values = values.get(kind, {}) if kind else values
        if "acc" not in values:
            continue
        em = values.get("exact_match")
        lines.append(f"{label:<8}{values['acc']:>9.4f}{em:>9.4f}" if em is not None else
                     f"{label:<8}{values['acc']:>9.4f}{'-':>9}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from editors import load_editor
    from editors.vllms import load_vllm
    from utils.evaluation import EvalConfig, evaluate

    check_args(args)
    check_trained(args.editor_name, args.editor_ckpt_path, args.allow_untrained)
    data_name, records = load_records(args.data_name, args.data_dir, args.data_sample_n)
    seed_everything(args.seed)
    vllm = load_vllm(args.edit_model_name, path=args.model_path, device=args.device)
    editor = load_editor(args.editor_name, vllm, args.config, args.editor_ckpt_path)
    cfg = EvalConfig(sequential_edit_n=args.sequential_edit_n, data_name=data_name,
                     eval_name_postfix=args.eval_name_postfix, editor_name=args.editor_name.strip().lower(),
                     model_name=vllm.name, results_dir=args.results_dir, batch_size=args.eval_batch_size,
                     exact_match=args.exact_match, lifelong=args.lifelong, overwrite=args.overwrite,
                     seed=args.seed, data_sample_n=args.data_sample_n, editor_checkpoint=args.editor_ckpt_path,
                     device=str(vllm.device), show_progress=not args.no_progress)
    outcome = evaluate(editor, records, cfg)
    if outcome.already_complete:
        print(f"already evaluated ({outcome.chunks_resumed} chunks); pass --overwrite to redo it")
    print(format_table(outcome.total_mean))
    info = outcome.run
    print(f"edits: {info['total_edit_n']} in {info['chunks']} chunk(s), {info['total_edit_time_s']:.2f} s editing"
          + (f" ({info['edits_per_s']:.2f} edits/s)" if info["edits_per_s"] else ""))
    print(f"results: {outcome.folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume after the last finished chunk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
