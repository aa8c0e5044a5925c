"""Train an editor (e.g. LiveEdit) for a vision-language model: the paper's command, same flags.

    python train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8 -dvc cuda:0 -tnp EVQA -eps 50 -sci 500
    python train_vllm_editor.py -en liveedit -mn tiny-blip2 -dna TOY -bs 8 --max_steps 200   # CPU, minutes

Writes records/<editor>/<model>/<[prefix-]YYYY.MM.DD-HH.MM.SS>/ (config.yaml, checkpoints/, logs/).
Resume an interrupted run with the same command plus `-lkpt <that run folder or one of its checkpoints>`.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def build_parser():
    """The parser generated from TrainRunConfig's fields (runs/train_config.py)."""
    from runs.cli import build_parser as generate
    from runs.train_config import TrainRunConfig

    return generate(
        TrainRunConfig, prog="train_vllm_editor.py",
        description="Train an editor's learned modules on an edit dataset (the paper's training script). "
                    "Writes records/<editor>/<model>/<[prefix-]date>/ with config.yaml, checkpoints/ and "
                    "TensorBoard logs/.",
        epilog="Example: python train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8 -dvc cuda:0 -tnp EVQA "
               "-eps 50 -sci 500. Errors a user can fix are printed as one 'error: ...' message (exit 2); "
               "Ctrl-C saves a checkpoint and prints how to resume (exit 130).")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from runs.cli import from_args
    from runs.train_config import TrainRunConfig
    from utils.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        cfg = from_args(TrainRunConfig, args)
        if cfg.extra_devices is not None:
            print("note: -edvc/--extra_devices is ignored: no second model copy is needed (features are "
                  "computed once per sample on the main device)")
        from runs.training import TrainingInterrupted, run_training

        run_training(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:  # a run folder that cannot be written (read-only, full, a file in the way)
        from utils.io import os_error_line

        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
