"""Editor registry: one line per method (peft style) and `load_editor`.

Configs live in `configs/<editor>/<backbone name>.yaml` (e.g. `configs/liveedit/blip2-opt-2.7b.yaml`,
`configs/liveedit/tiny-blip2.yaml`) and carry the paper's hyper-parameters.
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
    "none": "editors.baselines.noop:NoEdit",
    "serac_vl": "editors.baselines.serac:SERAC",
    "recipe_vl": "editors.baselines.recipe:RECIPE",
    "lte_vl": "editors.baselines.lte:LTE",
}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def editor_class(name: str):
    key = name.strip().lower()
    if key not in EDITORS:
        raise UserError(f"unknown editor {name!r}; valid editors: {', '.join(sorted(EDITORS))}")
    module, cls = EDITORS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def default_config_path(editor_name: str, vllm_name: str) -> str:
    return os.path.join(CONFIG_DIR, editor_name.strip().lower(), f"{vllm_name}.yaml")


def load_editor(name: str, vllm, config_path: str | None = None, checkpoint: str | None = None):
    """Build editor `name` on backbone `vllm` from its YAML config; load trained weights if given."""
    cls = editor_class(name)
    path = config_path or default_config_path(name, vllm.name)
    if not dataclasses.fields(cls.config_class):  # nothing to configure
        return cls(vllm, cls.config_class())
    if not os.path.isfile(path):
        raise UserError(f"no config for editor {name} on backbone {vllm.name}: {path} is missing "
                        f"(pass --config or add that file)")
    editor = cls(vllm, load_config(cls.config_class, path))
    if checkpoint:
        from editors.checkpoint import load_editor_weights

        load_editor_weights(editor, checkpoint)
    return editor
