"""One evaluation from its settings: check, load the records, the backbone and the editor, evaluate.

    outcome = run_evaluation(EvalConfig(sequential_edit_n=10, editor_name="ft_l", model_name="tiny-blip2",
                                        data_name="TOY", data_sample_n=50))

Cheap checks (names, the checkpoint's presence) come before anything large is loaded.
"""
from __future__ import annotations

import dataclasses
import sys

from editors import editor_class, load_editor
from editors.vllms.paths import set_aux_flag_paths
from editors.vllms import load_vllm
from utils.errors import UserError
from utils.io import seed_everything

from runs.data import load_split
from runs.eval_config import EvalConfig
from runs.evaluation import EvalOutcome, evaluate


def check_trained(editor_name: str, checkpoint: str | None, allow_untrained: bool) -> None:
    """Refuse an editor that needs training but has no checkpoint (W-6), before anything is loaded."""
    try:
        cls = editor_class(editor_name)
    except ImportError as exc:
        raise UserError(f"editor {editor_name!r} cannot be imported: {exc}") from exc
    if not cls.needs_training or checkpoint:
        return
    if not allow_untrained:
        raise UserError(f"editor {editor_name} needs training, but no checkpoint was given: pass "
                        f"-ckpt <path to a trained checkpoint>, or --allow_untrained to evaluate it with "
                        f"randomly initialised modules")
    print(f"warning: evaluating {editor_name} WITHOUT a checkpoint (randomly initialised modules)", file=sys.stderr)


def run_evaluation(cfg: EvalConfig) -> EvalOutcome:
    """Evaluate `cfg.editor_name` on `cfg.model_name` as `cfg` says (resuming a finished part)."""
    check_trained(cfg.editor_name, cfg.editor_checkpoint, cfg.allow_untrained)
    data_name, records = load_split(cfg.data_name, "eval", cfg.data_dir, cfg.data_sample_n)
    seed_everything(cfg.seed)
    vllm = load_vllm(cfg.model_name, path=cfg.model_path, device=cfg.device)
    set_aux_flag_paths(cfg.aux_model_paths)  # where the editor's auxiliary models are (if it has any)
    editor = load_editor(cfg.editor_name, vllm, cfg.config_path, cfg.editor_checkpoint)
    cfg = dataclasses.replace(cfg, data_name=data_name, editor_name=cfg.editor_name.strip().lower(),
                              model_name=vllm.name)
    return evaluate(editor, records, cfg)
