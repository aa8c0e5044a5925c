"""Editor registry: one line per method (peft style) and `load_editor`.

Configs live in `configs/<editor>/<backbone name>.yaml` (e.g. `configs/liveedit/blip2-opt-2.7b.yaml`,
`configs/liveedit/tiny-blip2.yaml`) and carry the paper's hyper-parameters.

An alias (`ALIASES`, e.g. `ft_vl`, the paper's name of FT-L) is the same editor as its canonical
name: it reads the canonical config folder (`configs/ft_l/`) and writes results under the canonical
name, so the two spellings share one result folder (and a rerun under either resumes it).
"""
from __future__ import annotations

import dataclasses
import importlib
import os

from utils.config import load_config
from utils.errors import UserError

# name -> "module:Class"; imported on first use so that one method's imports never slow another's.
EDITORS = {
    "liveedit": "editors.liveedit.editor:LiveEdit",
    "ft_l": "editors.baselines.ft:FTL",
    "ft_m": "editors.baselines.ft:FTM",
    "tp_vl": "editors.baselines.tp_vl:TPatcher",
    "grace": "editors.baselines.grace:GRACE",
    "none": "editors.baselines.noop:NoEdit",
    "lemoe_vl": "editors.baselines.lemoe:LEMoE",
    "wise": "editors.baselines.wise:WISE",
    "mend_vl": "editors.baselines.mend:MENDVL",
    "serac_vl": "editors.baselines.serac:SERAC",
    "recipe_vl": "editors.baselines.recipe:RECIPE",
    "lte_vl": "editors.baselines.lte:LTE",
}
# alias -> canonical name in EDITORS (the paper's spelling of an editor that exists under another name)
ALIASES = {"ft_vl": "ft_l"}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def canonical_editor_name(name: str) -> str:
    """The registry key of editor `name` (any case; an alias gives its canonical name)."""
    key = name.strip().lower()
    return ALIASES.get(key, key)


def editor_class(name: str):
    key = canonical_editor_name(name)
    if key not in EDITORS:
        raise UserError(f"unknown editor {name!r}; valid editors: {', '.join(sorted(set(EDITORS) | set(ALIASES)))}")
    module, cls = EDITORS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def default_config_path(editor_name: str, vllm_name: str) -> str:
    """`configs/<canonical editor name>/<backbone>.yaml` (an alias reads its canonical folder)."""
    return os.path.join(CONFIG_DIR, canonical_editor_name(editor_name), f"{vllm_name}.yaml")


def has_trained_modules(cls) -> bool:
    """Whether editor class `cls` has learned modules (so a checkpoint can be loaded into it)."""
    return callable(getattr(cls, "trainable_modules", None))


def editor_config(name: str, backbone: str, config_path: str | None = None, checkpoint=None):
    """The config to build editor `name` on `backbone` with.

    With a checkpoint (a `PinnedCheckpoint`) that records its config (meta.json `editor_config`):
    that config; a `config_path` that differs from it is refused, naming the differing keys.
    Otherwise (no checkpoint, or one without a config such as the authors' files): the YAML at
    `config_path`, else `configs/<name>/<backbone>.yaml`.
    """
    from utils.config import config_to_dict, from_dict

    cls = editor_class(name)
    if not dataclasses.fields(cls.config_class):  # nothing to configure
        return cls.config_class()
    saved = checkpoint.editor_config if checkpoint is not None else None
    if saved is not None:
        config = from_dict(cls.config_class, saved, where=f"{checkpoint.described_by} editor_config")
        if config_path is not None:
            from editors.checkpoint import config_differences

            differing = config_differences(config_to_dict(config),
                                           config_to_dict(load_config(cls.config_class, config_path)))
            if differing:
                raise UserError(f"--config {config_path} differs from the config checkpoint {checkpoint.path} was "
                                f"trained with (keys: {', '.join(differing)}); drop --config to use the "
                                f"checkpoint's own config")
        return config
    path = config_path or default_config_path(name, backbone)
    if not os.path.isfile(path):
        raise UserError(f"no config for editor {name} on backbone {backbone}: {path} is missing "
                        f"(pass --config or add that file)")
    return load_config(cls.config_class, path)


def load_editor(name: str, vllm, config_path: str | None = None, checkpoint=None):
    """Build editor `name` on backbone `vllm`; load trained weights if `checkpoint` is given.

    `checkpoint` is a path (step folder, run folder = its latest step, editor.safetensors, the
    authors' torch.save file) or a `PinnedCheckpoint`. The editor is built from the config the
    checkpoint records when it records one (see `editor_config`), else from the YAML. A checkpoint
    for another editor or backbone, or for an editor without trained modules, is refused.
    """
    cls = editor_class(name)
    pinned = None
    if checkpoint:
        from editors.checkpoint import PinnedCheckpoint, check_checkpoint_fits, pin_checkpoint

        if not has_trained_modules(cls):
            raise UserError(f"editor {name} has no trained modules, so it takes no checkpoint; drop the "
                            f"checkpoint ({checkpoint if isinstance(checkpoint, str) else checkpoint.path})")
        pinned = checkpoint if isinstance(checkpoint, PinnedCheckpoint) else pin_checkpoint(checkpoint)
        check_checkpoint_fits(pinned, name, vllm.name)
    editor = cls(vllm, editor_config(name, vllm.name, config_path, pinned))
    if pinned is not None:
        from editors.checkpoint import load_editor_weights

        load_editor_weights(editor, pinned)
    return editor
