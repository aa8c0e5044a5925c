"""Settings of one evaluation: the flags of `test_vllm_edit.py`, declared once (see `cli.py`).

Everything that changes the numbers is part of the run identity (`evaluation.run_identity`); a
rerun resumes only when it matches.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.errors import UserError
from utils.io import none_or_value
from utils.names import safe_name_part

from runs.cli import flag


@dataclass
class EvalConfig:
    """How to run one evaluation (flagged fields are the command line; the rest is Python API only)."""

    sequential_edit_n: int = flag("-sen", "--sequential_edit_n", help="edits per sequential chunk")
    editor_name: str = flag("-en", "--editor_name", default="", required=True,
                            help="editor, e.g. liveedit, ft_l, ft_m, none (any case); also the result folder name "
                                 "(Python API default: editor.name)")
    model_name: str = flag("-mn", "--edit_model_name", default="", required=True,
                           help="backbone: blip2 / llava / minigpt4 (or full names), or tiny-blip2 / tiny-llava / "
                                "tiny-minigpt4; the result folder uses the full name")
    data_name: str = flag("-dn", "--data_name", default="TOY", required=True,
                          help="EVQA, EIC, VLKEB, VLKEB-ONEHOP or TOY (any case)")
    eval_name_postfix: str = flag("-enp", "--eval_name_postfix", default="",
                                  help="appended to the result folder name as -<postfix>")
    device: str = flag("-dvc", "--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    editor_checkpoint: str | None = flag("-ckpt", "--editor_ckpt_path", default=None, type=none_or_value,
                                         help="trained editor checkpoint ('none' = no checkpoint)")
    data_sample_n: int | None = flag("-dsn", "--data_sample_n", default=None,
                                     help="evaluate only the first N records")
    model_path: str | None = flag("--model_path", default=None,
                                  help="local weight folder (else env var / configs/model_paths.yaml)")
    aux_model_paths: list[str] = flag("--aux_model_path", default=[], action="append", metavar="NAME=FOLDER",
                                      help="local folder of an auxiliary model a baseline uses (bert-base-cased, "
                                           "opt-125m, roberta-base, multi-qa-mpnet-base-dot-v1); repeat per model "
                                           "(else LIVEEDIT_<NAME>_PATH or configs/model_paths.yaml)")
    data_dir: str = flag("--data_dir", default="data", help="folder holding easy-edit-mm/, VLKEB/, toyworld/")
    config_path: str | None = flag("--config", default=None,
                                   help="editor YAML (default: configs/<editor>/<model>.yaml)")
    batch_size: int = flag("--eval_batch_size", default=16,
                           help="samples per scoring forward pass (any value gives the same numbers; "
                                "default: %(default)s)")
    allow_untrained: bool = flag("--allow_untrained", default=False,
                                 help="evaluate an editor that needs training without -ckpt (random modules)")
    lifelong: bool = flag("--lifelong", default=False,
                          help="never restore between chunks; report metrics after 1, 10, 100, ... edits")
    overwrite: bool = flag("--overwrite", default=False,
                           help="discard earlier results of this run and start over")
    exact_match: bool = flag("--exact_match", default=True,
                             help="also score greedy generation by exact match (default on)")
    results_dir: str = flag("--results_dir", default="eval_results", help="root folder of the results")
    seed: int = flag("--seed", default=0, help="seeds torch, numpy and the lifelong checkpoint sample")
    show_progress: bool = flag("--no_progress", default=True, action="store_false",
                               help="hide the progress bars")
    lifelong_sample_n: int = 1000
    """At most this many edited records are scored at a lifelong checkpoint."""
    tensorboard: bool = True
    """TensorBoard scalars under the result folder's tb/."""
    plot: bool = True
    """metrics_vs_edits.png in the result folder."""

    def __post_init__(self) -> None:
        from editors.vllms.paths import parse_aux_flags

        parse_aux_flags(self.aux_model_paths)  # NAME=FOLDER each, else a UserError naming the flag
        if self.sequential_edit_n < 1:
            raise UserError(f"-sen/--sequential_edit_n must be at least 1, got {self.sequential_edit_n}")
        if self.batch_size < 1:
            raise UserError(f"--eval_batch_size must be at least 1, got {self.batch_size}")
        if self.data_sample_n is not None and self.data_sample_n < 1:
            raise UserError(f"-dsn/--data_sample_n must be at least 1, got {self.data_sample_n}")
        if self.lifelong_sample_n < 1:
            raise UserError(f"lifelong_sample_n must be at least 1, got {self.lifelong_sample_n}")
        if self.eval_name_postfix:
            safe_name_part(self.eval_name_postfix, "-enp/--eval_name_postfix")
        self.editor_checkpoint = none_or_value(self.editor_checkpoint)
