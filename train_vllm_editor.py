"""Train an editor (e.g. LiveEdit) for a vision-language model: the paper's command, same flags.

    python train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8 -dvc cuda:0 -tnp EVQA -eps 50 -sci 500
    python train_vllm_editor.py -en liveedit -mn tiny-blip2 -dna TOY -bs 8 --max_steps 200   # CPU, minutes

Writes records/<editor>/<model>/<[prefix-]YYYY.MM.DD-HH.MM.SS>/ (config.yaml, checkpoints/, logs/).
Resume an interrupted run with the same command plus `-lkpt <that run folder or one of its checkpoints>`.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _optional_path(value: str) -> str | None:
    """'none' / 'None' / '' -> None (the paper's -lkpt convention)."""
    return None if value.strip().lower() in ("none", "") else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_vllm_editor.py",
        description="Train an editor's learned modules on an edit dataset (the paper's training script). "
                    "Writes records/<editor>/<model>/<[prefix-]date>/ with config.yaml, checkpoints/ and "
                    "TensorBoard logs/.",
        epilog="Example: python train_vllm_editor.py -en liveedit -mn blip2 -dna EVQA -bs 8 -dvc cuda:0 -tnp EVQA "
               "-eps 50 -sci 500. Errors a user can fix are printed as one 'error: ...' message (exit 2); "
               "Ctrl-C saves a checkpoint and prints how to resume (exit 130).")
    what = parser.add_argument_group("what to train")
    what.add_argument("-en", "--editor_name", required=True, help="editor to train, e.g. liveedit (case-insensitive)")
    what.add_argument("-mn", "--edit_model_name", required=True,
                      help="backbone: blip2, llava, minigpt4, a full name (blip2-opt-2.7b, ...) or tiny-blip2 / "
                           "tiny-llava / tiny-minigpt4 (small random models for tests and the demo)")
    what.add_argument("-dna", "--data_name", required=True,
                      help="training data: EVQA, EIC, VLKEB or TOY (the generated toy world, made on first use)")
    what.add_argument("-bs", "--batch_size", type=int, required=True, help="edit records per training step")
    what.add_argument("-dn", "--data_n", type=int, default=None,
                      help="use only the first N training records (default: all)")
    what.add_argument("--config", default=None,
                      help="editor YAML config; default configs/<editor>/<backbone>.yaml (the checkpoint's "
                           "config when resuming)")
    where = parser.add_argument_group("where things are")
    where.add_argument("-dvc", "--device", default="cpu",
                       help="device: cpu, cuda, cuda:N, mps or auto (default: %(default)s)")
    where.add_argument("-edvc", "--extra_devices", type=int, nargs="+", default=None,
                       help="accepted for compatibility with the paper's commands and ignored: no second model "
                            "copy is needed, features are computed once per sample on the main device")
    where.add_argument("--model_path", default=None,
                       help="local folder of the backbone weights (else the environment variable or paths YAML "
                            "described in the README)")
    where.add_argument("--data_dir", default="data",
                       help="folder holding the datasets, and toyworld/ for TOY (default: %(default)s)")
    where.add_argument("--records_dir", default="records",
                       help="root folder of the training runs (default: %(default)s)")
    where.add_argument("-tnp", "--train_name_prefix", default=None,
                       help="prefix of the run-folder name (default: none)")
    loop = parser.add_argument_group("training loop")
    loop.add_argument("-eps", "--epochs", type=int, default=1000,
                      help="last epoch, 1-based and inclusive: epochs 1..EPOCHS run (default: %(default)s)")
    loop.add_argument("--max_steps", type=int, default=None, help="stop after this global step (default: no limit)")
    loop.add_argument("-sci", "--save_ckpt_per_i", type=int, default=1000,
                      help="save a checkpoint every N steps; a final checkpoint is always saved, and one on "
                           "Ctrl-C (default: %(default)s)")
    loop.add_argument("-lpi", "--log_per_i", type=int, default=1,
                      help="write TensorBoard scalars every N steps (default: %(default)s)")
    loop.add_argument("-ea", "--ema_alpha", type=float, default=0.1,
                      help="weight of the newest loss in the EMA loss; the EMA starts at the first loss "
                           "(default: %(default)s)")
    loop.add_argument("-rs", "--random_seed", type=int, default=None,
                      help="seed of initialisation, data order and per-step randomness; default: from the clock "
                           "(the seed used is written to config.yaml); when resuming, the checkpoint's seed")
    loop.add_argument("-dbs", "--data_buffer_size", type=int, default=4,
                      help="batches prepared ahead by the data thread; 0 = prepare in the main thread "
                           "(default: %(default)s)")
    loop.add_argument("-lkpt", "--load_ckpt_path", type=_optional_path, default=None,
                      help="resume from this checkpoint (a step-N folder, its editor.safetensors, or a run folder "
                           "for its latest checkpoint) with its optimizer state and step; training continues at "
                           "the next step in the same run folder; 'none' (the default) = start fresh")
    return parser


def config_from_args(args: argparse.Namespace):
    """The parsed flags as a TrainRunConfig."""
    from utils.training import TrainRunConfig

    return TrainRunConfig(
        editor_name=args.editor_name, model_name=args.edit_model_name, data_name=args.data_name,
        batch_size=args.batch_size, device=args.device, epochs=args.epochs, max_steps=args.max_steps,
        save_every=args.save_ckpt_per_i, log_every=args.log_per_i, ema_alpha=args.ema_alpha,
        seed=args.random_seed, data_buffer_size=args.data_buffer_size, data_limit=args.data_n,
        records_dir=args.records_dir, name_prefix=args.train_name_prefix, model_path=args.model_path,
        data_dir=args.data_dir, config_path=args.config, resume_from=args.load_ckpt_path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from utils.errors import UserError

    if args.extra_devices is not None:
        print("note: -edvc/--extra_devices is ignored: no second model copy is needed (features are computed "
              "once per sample on the main device)")
    try:
        from editors import editor_class

        editor_class(args.editor_name)  # cheap name check before the heavy imports
        from utils.training import TrainingInterrupted, run_training

        run_training(config_from_args(args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
