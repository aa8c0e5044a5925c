"""Evaluate sequential (or lifelong) editing of a VLLM with an editor (the paper's `test_vllm_edit.py`).

Example (the paper's README command keeps working):
    python test_vllm_edit.py -en liveedit -mn blip2 -sen 1000 -dvc cuda:0 -dn EVQA \
        -ckpt records/liveedit/blip2-opt-2.7b/EVQA/checkpoints/ckpt
On the embedded toy world, with no weights or data to download:
    python test_vllm_edit.py -en ft_l -mn tiny-llava -sen 10 -dn toy -dsn 50

Results go to `<results_dir>/<editor>/<model>/<DATA>[-postfix]/sequential_edit_<n>/` (see
`runs/evaluation.py`); rerunning the same command resumes after the last finished chunk.
The flags are the fields of `runs/eval_config.py:EvalConfig`.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from runs.cli import build_parser as generate_parser, from_args  # noqa: E402
from runs.eval_config import EvalConfig  # noqa: E402
from runs.results import format_table  # noqa: E402
from utils.errors import UserError  # noqa: E402


def build_parser():
    return generate_parser(EvalConfig, prog="test_vllm_edit.py",
                           description="Evaluate sequential knowledge editing of a vision-language model.",
                           epilog="Errors a user can fix are printed as one 'error: ...' line (exit 2); Ctrl-C "
                                  "keeps every finished chunk, and the same command resumes (exit 130).")


def run(cfg: EvalConfig) -> int:
    from runs.eval_run import run_evaluation

    outcome = run_evaluation(cfg)
    if outcome is None:  # a torchrun rank other than 0: its chunk files are written, rank 0 merges
        return 0
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
        return run(from_args(EvalConfig, args))
    except UserError as exc:
        print(f"error: {_rank()}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a results folder that cannot be written (read-only, full, a file in the way)
        from utils.io import os_error_line

        print(f"error: {_rank()}{os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume after the last finished chunk", file=sys.stderr)
        return 130


def _rank() -> str:
    """'rank R of N: ' under torchrun, so each rank's error line says which rank it comes from."""
    from runs.distributed import rank_prefix

    return rank_prefix()


if __name__ == "__main__":
    sys.exit(main())
