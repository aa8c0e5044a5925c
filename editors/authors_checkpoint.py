"""The authors' LiveEdit checkpoints: read them, or convert one into a step folder.

The paper's code saves `torch.save({"train_modules": {module name: state dict}, "i": step,
"epoch": ..., "loss": ..., "ema_loss": ..., "opt": ..., "lr_scheduler": ...}, path)`; the five
module names and their parameter names are LiveEdit's here (`LiveEdit.trainable_modules`). Only
`train_modules` is used (the optimizer state is not). The file records no editor config, no
backbone and no editor name: the editor is built from the YAML, which must be the one it was
trained with.

    python -m editors.checkpoint convert <authors.pt> <out>/step-N --backbone blip2 [--config x.yaml]

writes a step folder whose meta.json records the backbone and the YAML's config, so evaluation
then checks both.
"""
from __future__ import annotations

import argparse
import datetime
import os
import pickle
import re
import sys
import zipfile

import torch

from utils.errors import UserError

TRAIN_MODULES_KEY = "train_modules"
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_authors_file(file: str) -> dict[str, torch.Tensor]:
    """`<module>.<param>` -> tensor from an authors' checkpoint (its `train_modules` entry)."""
    return _flatten(file, _load(file))


def _load(file: str) -> dict:
    """The dict in an authors' checkpoint, read with `torch.load(weights_only=True)`.

    Zip-format files are memory-mapped (the optimizer state in them is never copied into memory).
    A file that needs arbitrary objects unpickled is refused: unpickling can run code.
    """
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is None:
            raise UserError(f"{file} is not a torch.save checkpoint or is corrupt (torch.load: "
                            f"{_first_line(exc)})") from None
        raise UserError(f"{file} is refused: reading it needs unpickling of the Python object {found.group(1)}, "
                        f"which could run arbitrary code (only tensors, numbers and dicts are read); in a "
                        f"session you trust, re-save just its modules: torch.save({{'{TRAIN_MODULES_KEY}': "
                        f"torch.load(path, weights_only=False)['{TRAIN_MODULES_KEY}']}}, new_path)") from None
    except Exception as exc:  # noqa: BLE001 - zip / storage errors on a truncated file
        raise UserError(f"{file} is not a torch.save checkpoint or is truncated or corrupt "
                        f"({type(exc).__name__}: {_first_line(exc)})") from None
    modules = state.get(TRAIN_MODULES_KEY) if isinstance(state, dict) else None
    if not isinstance(modules, dict) or not all(isinstance(m, dict) for m in modules.values()):
        keys = sorted(map(str, state))[:10] if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{file} is not a checkpoint of this tool or of the authors' code: it has no "
                        f"'{TRAIN_MODULES_KEY}' dict of module state dicts (found {keys}); give a step-N folder, "
                        f"a run folder, an editor.safetensors or an authors' checkpoint")
    return state


def _flatten(file: str, state: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for name, module_state in state[TRAIN_MODULES_KEY].items():
        for key, value in module_state.items():
            if not isinstance(value, torch.Tensor):
                raise UserError(f"{file}: {TRAIN_MODULES_KEY}.{name}.{key} is not a tensor")
            flat[f"{name}.{key}"] = value
    return flat


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _training_info(state: dict) -> dict:
    """Step / epoch / losses of an authors' checkpoint (its `i`, `epoch`, `loss`, `ema_loss` entries)."""
    out = {}
    for ours, theirs in (("step", "i"), ("epoch", "epoch"), ("loss", "loss"), ("ema_loss", "ema_loss")):
        value = state.get(theirs)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[ours] = value
    return out


def convert(file: str, out: str, backbone: str, config_path: str | None = None,
            editor_name: str = "liveedit") -> str:
    """Write the authors' checkpoint `file` as step folder `out` for `backbone`; returns `out`.

    meta.json records the editor, the backbone and the editor config read from `config_path`
    (default `configs/<editor>/<backbone>.yaml`); trainer_state.pt holds the step and no optimizer.
    """
    from safetensors.torch import save_file

    from editors import default_config_path, editor_class
    from editors.checkpoint import EDITOR_FILE, FORMAT_VERSION, META_FILE, TRAINER_FILE
    from editors.vllms import canonical_name
    from utils.config import config_to_dict, load_config
    from utils.io import folder_atomic, fsync_path, write_json_atomic

    backbone = canonical_name(backbone)
    cls = editor_class(editor_name)
    config_path = config_path or default_config_path(editor_name, backbone)
    if not os.path.isfile(config_path):
        raise UserError(f"no config for editor {editor_name} on backbone {backbone}: {config_path} is missing; "
                        f"pass --config with the YAML the checkpoint was trained with")
    config = config_to_dict(load_config(cls.config_class, config_path))
    if not os.path.isfile(file):
        raise UserError(f"checkpoint file not found: {file}")
    if os.path.exists(out):
        raise UserError(f"{out} already exists; give a new folder (e.g. .../checkpoints/step-N)")
    state = _load(file)
    tensors = {k: v.to("cpu", copy=True).contiguous() for k, v in _flatten(file, state).items()}
    info = _training_info(state)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with folder_atomic(out) as tmp:
        save_file(tensors, os.path.join(tmp, EDITOR_FILE),
                  metadata={"editor": cls.name, "backbone": backbone, "format": str(FORMAT_VERSION)})
        step = int(info.get("step", 0))
        torch.save({**info, "step": step, "optimizer": None, "scheduler": None}, os.path.join(tmp, TRAINER_FILE))
        meta = {"format": FORMAT_VERSION, "editor": cls.name, "backbone": backbone, "step": step,
                "epoch": info.get("epoch"), "ema_loss": info.get("ema_loss"), "loss": info.get("loss"),
                "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "converted_from": os.path.abspath(file), "editor_config": config}
        write_json_atomic(os.path.join(tmp, META_FILE), meta, indent=2, default=str)  # last
        for name in (EDITOR_FILE, TRAINER_FILE):
            fsync_path(os.path.join(tmp, name))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m editors.checkpoint",
                                     description="Checkpoint tools. convert: the authors' torch.save checkpoint "
                                                 "-> a step folder (editor.safetensors, trainer_state.pt, meta.json).")
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="convert an authors' checkpoint into a step folder")
    conv.add_argument("checkpoint", help="the authors' file (torch.save dict with 'train_modules')")
    conv.add_argument("out", help="the step folder to write (must not exist), e.g. records/authors/step-N")
    conv.add_argument("--backbone", required=True, help="the backbone it was trained on: blip2 / llava / minigpt4 "
                                                        "(or full or tiny names)")
    conv.add_argument("--config", default=None, help="editor YAML it was trained with (default: "
                                                     "configs/<editor>/<backbone>.yaml); recorded in meta.json")
    conv.add_argument("--editor", default="liveedit", help="editor name (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out, args.backbone, args.config, args.editor)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}; evaluate with -ckpt {out}")
    return 0


__all__ = ["read_authors_file", "convert", "main", "TRAIN_MODULES_KEY"]
