"""One evaluation from its settings: check, load the records, the backbone and the editor, evaluate.

    outcome = run_evaluation(EvalConfig(sequential_edit_n=10, editor_name="ft_l", model_name="tiny-blip2",
                                        data_name="TOY", data_sample_n=50))

Cheap checks (names, the checkpoint: resolved once, its meta.json, its config against --config) come
before anything large is loaded.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from editors import canonical_editor_name, editor_class, editor_config, has_trained_modules, load_editor
from editors.checkpoint import PinnedCheckpoint, check_checkpoint_fits, pin_checkpoint
from editors.vllms import MARKER_FILE, RAW_SUFFIX, canonical_name, load_vllm
from editors.vllms.paths import set_aux_flag_paths
from utils.errors import UserError
from utils.io import read_json, seed_everything

from runs import distributed
from runs.data import check_lengths, draw_records, load_split
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


def check_checkpoint(cfg: EvalConfig) -> PinnedCheckpoint | None:
    """Resolve `-ckpt` once and check it against the flags, before anything large is loaded.

    Refuses: a checkpoint for an editor without trained modules, a missing path, a checkpoint
    recorded for another editor or backbone, a --config that differs from the checkpoint's own.
    """
    if cfg.editor_checkpoint is None:
        return None
    name = cfg.editor_name.strip().lower()
    if not has_trained_modules(editor_class(name)):
        raise UserError(f"editor {name} has no trained modules, so it takes no checkpoint: drop "
                        f"-ckpt {cfg.editor_checkpoint}")
    pinned = pin_checkpoint(cfg.editor_checkpoint)
    backbone = expected_backbone(cfg)
    check_checkpoint_fits(pinned, name, backbone)
    editor_config(name, backbone, cfg.config_path, pinned)  # reads --config / the YAML and compares now
    return pinned


def expected_backbone(cfg: EvalConfig) -> str:
    """The name `load_vllm` will give the backbone (a saved backbone folder records its own)."""
    marker = os.path.join(cfg.model_path, MARKER_FILE) if cfg.model_path else ""
    if marker and os.path.isfile(marker):
        saved = read_json(marker)
        if isinstance(saved, dict) and isinstance(saved.get("name"), str):  # + ":raw" when asked for
            return saved["name"] + RAW_SUFFIX * canonical_name(cfg.model_name).endswith(RAW_SUFFIX)
    return canonical_name(cfg.model_name)


def run_evaluation(cfg: EvalConfig) -> EvalOutcome | None:
    """Evaluate `cfg.editor_name` on `cfg.model_name` as `cfg` says (resuming a finished part).

    Under torchrun the chunks are shared out over the ranks (runs/eval_shards.py): rank 0 returns
    the outcome, the other ranks None."""
    distributed.check_device_map(cfg.device_map)
    group, device = distributed.setup(cfg.device, cfg.dist_timeout)
    try:
        return _run_evaluation(cfg, group, device)
    finally:
        distributed.shutdown(group)


def _run_evaluation(cfg: EvalConfig, group: distributed.Group, device: str) -> EvalOutcome | None:
    check_trained(cfg.editor_name, cfg.editor_checkpoint, cfg.allow_untrained)
    pinned = check_checkpoint(cfg)
    shuffled = cfg.record_seed is not None
    data_name, records = load_split(cfg.data_name, "eval", cfg.data_dir, None if shuffled else cfg.data_sample_n)
    if shuffled:
        records = draw_records(records, cfg.record_seed, cfg.data_sample_n)
    seed_everything(cfg.seed)
    vllm = load_vllm(cfg.model_name, path=cfg.model_path, device=device, dtype=cfg.dtype,
                     device_map=cfg.device_map)
    check_lengths(vllm, records)
    set_aux_flag_paths(cfg.aux_model_paths)  # where the editor's auxiliary models are (if it has any)
    editor = load_editor(cfg.editor_name, vllm, cfg.config_path, pinned)
    cfg = dataclasses.replace(cfg, data_name=data_name, editor_name=canonical_editor_name(cfg.editor_name),
                              model_name=vllm.name, editor_checkpoint=pinned.path if pinned else None)
    return evaluate(editor, records, cfg, group)
