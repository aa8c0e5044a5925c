"""Settings of one evaluation: the flags of `test_vllm_edit.py`, declared once (see `cli.py`).

Everything that changes the numbers is part of the run identity (`evaluation.run_identity`); a
rerun resumes only when it matches.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.devices import DEVICE_MAP_HELP, DTYPE_CHOICES, parse_device_map
from utils.errors import UserError
from utils.io import check_seed, none_or_value
from utils.names import safe_name_part

from runs.cli import flag


@dataclass
class EvalConfig:
    """How to run one evaluation (flagged fields are the command line; the rest is Python API only)."""

    sequential_edit_n: int = flag("-sen", "--sequential_edit_n", help="edits per sequential chunk")
    editor_name: str = flag("-en", "--editor_name", default="", required=True,
                            help="editor: liveedit, ft_l (alias ft_vl), ft_m, tp_vl, grace, lemoe_vl, wise, mend_vl, "
                                 "none (any case); its canonical name is the result folder name (Python API "
                                 "default: editor.name)")
    model_name: str = flag("-mn", "--edit_model_name", default="", required=True,
                           help="backbone: blip2 / llava / minigpt4 / qwen2.5-vl / qwen3-vl / internvl / gemma3 / "
                                "llava-onevision / smolvlm / smolvlm2 (or full names; ':raw' after a processor-driven "
                                "one's name: no chat template), or its tiny-<family> version (README's backbone "
                                "table); the result folder uses the full name")
    data_name: str = flag("-dn", "--data_name", default="TOY", required=True,
                          help="EVQA, EIC, VLKEB, VLKEB-ONEHOP or TOY (any case)")
    eval_name_postfix: str = flag("-enp", "--eval_name_postfix", default="",
                                  help="appended to the result folder name as -<postfix>")
    device: str = flag("-dvc", "--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    device_map: str = flag("--device_map", default="none",
                           help="one backbone over several devices of this process: " + DEVICE_MAP_HELP +
                                "; LiveEdit's modules sit where the edited layer runs (default: %(default)s)")
    dtype: str = flag("--dtype", default="auto", choices=DTYPE_CHOICES,
                      help="backbone weights' dtype, read directly in it: auto = bfloat16 on a CUDA GPU that "
                           "supports it, else float32 (default: %(default)s)")
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
    keep_partial_chunk: bool = flag("--keep_partial_chunk", default=False,
                                    help="also evaluate the trailing chunk with fewer than -sen edits (default: drop "
                                         "it, as the authors' split_data does, so totals match the paper's; "
                                         "--lifelong always edits every record)")
    portability_second_edit: bool = flag(
        "--portability_second_edit", default=True,
        help="VLKEB one-hop (-dn VLKEB-ONEHOP): after each record's edit, make VLKEB's second, text-only edit "
             "port_edit_q -> port_edit_a before port_q is scored against port_a (default on, as VLKEB "
             "evaluates); --no-portability_second_edit scores port_q after the main edit only")
    routing_diagnostics: bool = flag(
        "--routing_diagnostics", default=True,
        help="for a routing editor (LiveEdit): whether each query's own expert is selected, experts selected "
             "per query, the own expert's soft weight, the share of M-Loc probes routed; written as 'routing' "
             "in mean_results.json and TensorBoard (one extra pass to the edit layer per scored image sample)")
    dist_timeout: float | None = flag(
        "--dist_timeout", default=None,
        help="torchrun only: seconds a rank waits for the others in a collective (joining, the start) before "
             "failing with a message naming it (default: the environment variable LIVEEDIT_DIST_TIMEOUT, else 600)")
    results_dir: str = flag("--results_dir", default="eval_results", help="root folder of the results")
    seed: int = flag("--seed", default=0, help="seeds torch, numpy and the lifelong checkpoint sample")
    record_seed: int | None = flag(
        "--record_seed", default=None, type=none_or_value,
        help="draw which eval records are edited and in what order: a permutation of the whole split seeded "
             "by this number, then -dsn takes its first n (the authors' evaluator's random option); "
             "'none' (the default) keeps the split's order")
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
        if self.dist_timeout is not None and self.dist_timeout <= 0:
            raise UserError(f"--dist_timeout must be a positive number of seconds, got {self.dist_timeout}")
        if self.lifelong_sample_n < 1:
            raise UserError(f"lifelong_sample_n must be at least 1, got {self.lifelong_sample_n}")
        if self.dtype not in DTYPE_CHOICES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        parse_device_map(self.device_map)  # none, auto or a readable JSON map naming devices that exist
        check_seed(self.seed, "--seed")
        if self.record_seed is not None:
            self.record_seed = int(self.record_seed)
            check_seed(self.record_seed, "--record_seed")
        if self.eval_name_postfix:
            safe_name_part(self.eval_name_postfix, "-enp/--eval_name_postfix")
        self.editor_checkpoint = none_or_value(self.editor_checkpoint)
