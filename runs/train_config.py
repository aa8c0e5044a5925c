"""Settings of one training run: the flags of `train_vllm_editor.py`, declared once (see `cli.py`)."""
from __future__ import annotations

from dataclasses import dataclass

from utils.devices import DEVICE_MAP_HELP, DTYPE_CHOICES, parse_device_map
from utils.errors import UserError
from utils.io import check_seed, none_or_value
from utils.names import safe_name_part

from runs.cli import flag

WHAT, WHERE, LOOP = "what to train", "where things are", "training loop"


@dataclass
class TrainRunConfig:
    """Every setting of a run; written to the run's config.yaml (with the seed actually used)."""

    editor_name: str = flag("-en", "--editor_name", group=WHAT,
                            help="editor to train: liveedit or mend_vl (case-insensitive)")
    model_name: str = flag("-mn", "--edit_model_name", group=WHAT,
                           help="backbone: blip2, llava, minigpt4, qwen2.5-vl, qwen3-vl, internvl, gemma3, llava-onevision, "
                                "smolvlm, smolvlm2, a full name (blip2-opt-2.7b, ...) or tiny-<family> (tiny-blip2, "
                                "tiny-llava, tiny-minigpt4, tiny-qwen2.5-vl, tiny-qwen3-vl, tiny-internvl, tiny-gemma3, "
                                "tiny-llava-onevision, tiny-smolvlm: small random models for tests and the demo); "
                                "README's backbone table")
    data_name: str = flag("-dna", "--data_name", group=WHAT,
                          help="training data: EVQA, EIC, VLKEB or TOY (the generated toy world, made on first use)")
    batch_size: int = flag("-bs", "--batch_size", group=WHAT,
                           help="edit records per training step, the GLOBAL batch: under torchrun it is split "
                                "over the ranks (it must be divisible by their number) and the steps are those of "
                                "one process; the last batch of an epoch may be smaller")
    data_limit: int | None = flag("-dn", "--data_n", default=None, group=WHAT,
                                  help="use only the first N training records (default: all)")
    config_path: str | None = flag("--config", default=None, group=WHAT,
                                   help="editor YAML config; default configs/<editor>/<backbone>.yaml (the "
                                        "checkpoint's config when resuming)")
    device: str = flag("-dvc", "--device", default="cpu", group=WHERE,
                       help="device: cpu, cuda, cuda:N, mps or auto (default: %(default)s)")
    extra_devices: list[int] | None = flag(
        "-edvc", "--extra_devices", default=None, group=WHERE, nargs="+",
        help="accepted for compatibility with the paper's commands and ignored: no second model copy is "
             "needed, features are computed once per sample on the main device")
    device_map: str = flag("--device_map", default="none", group=WHERE,
                           help="one backbone over several devices of this process: " + DEVICE_MAP_HELP +
                                "; LiveEdit's modules sit where the edited layer runs (default: %(default)s)")
    dtype: str = flag("--dtype", default="auto", group=WHERE, choices=DTYPE_CHOICES,
                      help="backbone weights' dtype, read directly in it: auto = bfloat16 on a CUDA GPU that "
                           "supports it, else float32 (default: %(default)s)")
    model_path: str | None = flag("--model_path", default=None, group=WHERE,
                                  help="local folder of the backbone weights (else the environment variable or "
                                       "paths YAML described in the README)")
    aux_model_paths: list[str] = flag("--aux_model_path", default=[], group=WHERE, action="append",
                                      metavar="NAME=FOLDER",
                                      help="local folder of an auxiliary model a baseline uses (bert-base-cased, "
                                           "opt-125m, roberta-base, multi-qa-mpnet-base-dot-v1); repeat per model "
                                           "(else LIVEEDIT_<NAME>_PATH or configs/model_paths.yaml)")
    data_dir: str = flag("--data_dir", default="data", group=WHERE,
                         help="folder holding the datasets, and toyworld/ for TOY (default: %(default)s)")
    records_dir: str = flag("--records_dir", default="records", group=WHERE,
                            help="root folder of the training runs (default: %(default)s)")
    name_prefix: str | None = flag("-tnp", "--train_name_prefix", default=None, group=WHERE,
                                   help="prefix of the run-folder name (default: none)")
    epochs: int = flag("-eps", "--epochs", default=1000, group=LOOP,
                       help="last epoch, 1-based and inclusive: epochs 1..EPOCHS run (default: %(default)s)")
    max_steps: int | None = flag("--max_steps", default=None, group=LOOP,
                                 help="stop after this global step (default: no limit)")
    save_every: int = flag("-sci", "--save_ckpt_per_i", default=1000, group=LOOP,
                           help="save a checkpoint every N steps; a final checkpoint is always saved, and one on "
                                "Ctrl-C (default: %(default)s)")
    log_every: int = flag("-lpi", "--log_per_i", default=1, group=LOOP,
                          help="write TensorBoard scalars every N steps (default: %(default)s)")
    ema_alpha: float = flag("-ea", "--ema_alpha", default=0.1, group=LOOP,
                            help="weight of the newest loss in the EMA loss; the EMA starts at the first loss "
                                 "(default: %(default)s)")
    seed: int | None = flag("-rs", "--random_seed", default=None, group=LOOP,
                            help="seed of initialisation, data order and per-step randomness; default: from the "
                                 "clock (the seed used is written to config.yaml); when resuming, the "
                                 "checkpoint's seed")
    data_buffer_size: int = flag("-dbs", "--data_buffer_size", default=4, group=LOOP,
                                 help="batches prepared ahead by the data thread; 0 = prepare in the main thread "
                                      "(default: %(default)s)")
    batch_neighbours: int = flag(
        "--batch_neighbours", default=0, group=LOOP, metavar="K",
        help="compose each batch of -bs B from ceil(B/(K+1)) anchor records (drawn as with 0) plus, for each, "
             "its K visually nearest training records (by the frozen backbone's mean image feature, computed "
             "once and cached in the run folder), so contrastive routing losses see look-alikes as negatives; "
             "an epoch is then every record once as an anchor. 0 = uniform batches (default: %(default)s)")
    dist_timeout: float | None = flag(
        "--dist_timeout", default=None, group=WHERE,
        help="torchrun only: seconds a rank waits for the others in a collective before failing with a message "
             "naming it (default: the environment variable LIVEEDIT_DIST_TIMEOUT, else 600)")
    resume_from: str | None = flag(
        "-lkpt", "--load_ckpt_path", default=None, group=LOOP, type=none_or_value,
        help="resume from this checkpoint (a step-N folder, its editor.safetensors, or a run folder for its "
             "latest checkpoint) with its optimizer state and step; training continues at the next step in the "
             "same run folder (records_dir and the prefix are then unused); 'none' (the default) = start fresh")

    def __post_init__(self) -> None:
        """Range checks of the numeric settings; each failure names the flag to change."""
        from editors.vllms.paths import parse_aux_flags

        parse_aux_flags(self.aux_model_paths)  # NAME=FOLDER each, else a UserError naming the flag
        checks = [
            (self.batch_size >= 1, "-bs/--batch_size must be at least 1"),
            (self.epochs >= 1, "-eps/--epochs must be at least 1 (epochs are 1-based and inclusive)"),
            (self.max_steps is None or self.max_steps >= 1, "--max_steps must be at least 1"),
            (self.save_every >= 1, "-sci/--save_ckpt_per_i must be at least 1"),
            (self.log_every >= 1, "-lpi/--log_per_i must be at least 1"),
            (0.0 < self.ema_alpha <= 1.0, "-ea/--ema_alpha must be in (0, 1]"),
            (self.data_buffer_size >= 0, "-dbs/--data_buffer_size must be 0 or more"),
            (self.batch_neighbours >= 0, "--batch_neighbours must be 0 or more"),
            (self.batch_neighbours == 0 or self.batch_neighbours < self.batch_size,
             f"--batch_neighbours {self.batch_neighbours} must be smaller than -bs/--batch_size {self.batch_size} "
             f"(a batch holds an anchor and its neighbours)"),
            (self.data_limit is None or self.data_limit >= 1, "-dn/--data_n must be at least 1"),
            (self.dist_timeout is None or self.dist_timeout > 0, "--dist_timeout must be a positive number of seconds"),
            (self.dtype in DTYPE_CHOICES, f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        parse_device_map(self.device_map)  # none, auto or a readable JSON map naming devices that exist
        if self.seed is not None:
            check_seed(self.seed, "-rs/--random_seed")
        if self.name_prefix:
            safe_name_part(self.name_prefix, "-tnp/--train_name_prefix")
        self.resume_from = none_or_value(self.resume_from)
