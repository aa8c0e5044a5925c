"""Train an editor (e.g. LiveEdit) for a vision-language model: the paper's command, same flags.

    python train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8 -dvc cuda:0 -tnp EVQA -eps 50 -sci 500
    python train_vllm_editor.py -en liveedit -mn tiny-blip2 -dna TOY -bs 8 --max_steps 200   # CPU, minutes

Writes records/<editor>/<model>/<[prefix-]YYYY.MM.DD-HH.MM.SS>/ (config.yaml, checkpoints/, logs/).
Resume an interrupted run with the same command plus `-lkpt <that run folder or one of its checkpoints>`.

Exit codes: 0 done; 1 an unexpected error (traceback); 2 a setting or file to fix (one `error:` line);
3 the loss or gradients became non-finite; 130 Ctrl-C; 143 SIGTERM. Whenever steps had finished,
the last finished step is saved first and its checkpoint named.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time

EXIT_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130   # 128 + SIGINT
EXIT_TERMINATED = 143    # 128 + SIGTERM


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
               "-eps 50 -sci 500. Exit codes: 0 done; 2 an error a user can fix, printed as one 'error: ...' line; "
               "3 the loss or gradients became non-finite (lower the learning rate; the last finite step is "
               "saved); 130 Ctrl-C and 143 SIGTERM (kill, timeout, SLURM, docker stop): the last finished step "
               "is saved and the resume command (-lkpt) printed; 1 an unexpected error, with its traceback, "
               "after saving the last finished step.")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from runs.signals import exit_code_of, signal_label, signal_of, terminate_like_ctrl_c

    with terminate_like_ctrl_c():  # SIGTERM while loading stops like Ctrl-C, not silently
        try:
            return _train(argv)
        except KeyboardInterrupt as exc:  # only before the trainer started: it turns signals into its own
            print(f"interrupted ({signal_label(signal_of(exc))}) before training started; nothing was saved",
                  file=sys.stderr)
            return exit_code_of(exc)


def _train(argv: list[str] | None) -> int:
    """Parse and train; each way a run can end becomes its message and exit code (`_report`)."""
    from runs.cli import from_args
    from runs.train_config import TrainRunConfig

    args = build_parser().parse_args(argv)
    try:
        cfg = from_args(TrainRunConfig, args)
        if cfg.extra_devices is not None:
            print("note: -edvc/--extra_devices is ignored: no second model copy is needed (features are "
                  "computed once per sample on the main device)")
        from runs.training import run_training

        run_training(cfg)
    except Exception as exc:  # noqa: BLE001 - each kind gets its message; unknown ones are re-raised
        code = _report(exc)
        if code is None:
            raise
        return code
    return 0


def _report(exc: Exception) -> int | None:
    """Print how the run ended (the saved checkpoint first, then the error); the exit code, or None
    for an exception raised before training that is no user error (re-raised with its traceback)."""
    import traceback

    from utils.errors import UserError

    training = sys.modules.get("runs.training")  # not imported yet: the error came before training
    if training is not None and isinstance(exc, training.TrainingDiverged):
        print(f"error: {_rank()}{exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if training is not None and isinstance(exc, training.TrainingInterrupted):
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    note = training.stop_note(exc) if training is not None else None
    if note is not None:
        print(note, file=sys.stderr)
        exc.__notes__.remove(note)  # printed once, before the error
    if isinstance(exc, UserError):
        print(f"error: {_rank()}{exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(exc, OSError):  # a run folder that cannot be written (read-only, full, a file in the way)
        from utils.io import os_error_line

        print(f"error: {_rank()}{os_error_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if note is None:
        return None
    traceback.print_exception(exc)
    return EXIT_ERROR


def _rank() -> str:
    """'rank R of N: ' under torchrun, so each rank's error line says which rank it comes from."""
    from runs.distributed import rank_prefix

    return rank_prefix()


if __name__ == "__main__":
    sys.exit(main())
