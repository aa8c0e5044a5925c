"""Checkpoints of trainable editors: save, find, load, with clear errors for every bad file.

Layout (one folder per checkpoint, inside a run's `checkpoints/` folder):

    checkpoints/
        step-<N>/
            editor.safetensors   every trainable module's state dict, keys `<module>.<param>`
            trainer_state.pt     optimizer + scheduler state dicts, step, epoch, EMA loss, ...
                                 (plain tensors and numbers: `torch.load(weights_only=True)` reads it)
            meta.json            editor, backbone, step, epoch, losses, time; written LAST
        latest                   text file naming the newest step folder (written atomically)

Writes are atomic: a checkpoint is written into a hidden temporary sibling folder and renamed
into place, and `meta.json` is its last file. A kill during a write leaves the previous
checkpoints untouched and no folder that looks finished; readers ignore folders without
`meta.json` and hidden folders.

Evaluation pins a checkpoint once (`pin_checkpoint`): a run folder becomes the real path of the
step folder its `latest` names at that moment, so a run that resumes later cannot mix two
checkpoints. The authors' `torch.save` files (`{"train_modules": {...}, ...}`) load as well
(`editors/authors_checkpoint.py`); `python -m editors.checkpoint convert` turns one into a step folder.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import sys
from typing import Any

import torch

from utils.errors import UserError
from utils.io import folder_atomic, fsync_path, write_json_atomic, write_text_atomic

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
EDITOR_FILE = "editor.safetensors"
TRAINER_FILE = "trainer_state.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_MAX_LISTED_KEYS = 10


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint taken after step `step`."""
    return f"step-{int(step)}"


def editor_state_dict(editor) -> dict[str, torch.Tensor]:
    """`<module>.<param>` -> CPU tensor for every trainable module of `editor` (copies, contiguous)."""
    state = {}
    for name, module in editor.trainable_modules().items():
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return state


def save_checkpoint(directory: str, editor, optimizer: torch.optim.Optimizer | None, scheduler: Any,
                    state: dict) -> str:
    """Write checkpoint `step-<state["step"]>` into `directory` (a run's `checkpoints/`) atomically.

    `state` must hold `step`; `epoch`, `ema_loss`, `loss` and any other plain values (numbers,
    strings, lists) are stored in `trainer_state.pt`, and the main ones in `meta.json`. An
    existing folder of the same step is replaced. Returns the path of the new folder and points
    `checkpoints/latest` at it.
    """
    from safetensors.torch import save_file

    if "step" not in state:
        raise ValueError("save_checkpoint: state must contain 'step'")
    os.makedirs(directory, exist_ok=True)
    name = checkpoint_name(state["step"])
    final = os.path.join(directory, name)
    with folder_atomic(final) as tmp:
        backbone = getattr(getattr(editor, "vllm", None), "name", "")
        save_file(editor_state_dict(editor), os.path.join(tmp, EDITOR_FILE),
                  metadata={"editor": editor.name, "backbone": backbone, "format": str(FORMAT_VERSION)})
        trainer_state = dict(state)
        trainer_state["optimizer"] = optimizer.state_dict() if optimizer is not None else None
        trainer_state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
        torch.save(trainer_state, os.path.join(tmp, TRAINER_FILE))
        write_json_atomic(os.path.join(tmp, META_FILE), _meta(editor, backbone, state), indent=2,
                          default=str)  # last
        for file in (EDITOR_FILE, TRAINER_FILE):
            fsync_path(os.path.join(tmp, file))
    write_latest(directory, name)
    return final


def _meta(editor, backbone: str, state: dict) -> dict:
    from utils.config import config_to_dict

    config = getattr(editor, "config", None)
    meta = {
        "format": FORMAT_VERSION,
        "editor": editor.name,
        "backbone": backbone,
        "step": int(state["step"]),
        "epoch": state.get("epoch"),
        "ema_loss": state.get("ema_loss"),
        "loss": state.get("loss"),
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        meta["editor_config"] = config_to_dict(config)
    except TypeError:  # not a dataclass: nothing to record
        pass
    return meta


def write_latest(directory: str, name: str) -> None:
    """Point `directory/latest` at checkpoint folder `name` (atomic replace)."""
    write_text_atomic(os.path.join(directory, LATEST_FILE), name + "\n")


# ---------------------------------------------------------------------------------------------
# Finding
# ---------------------------------------------------------------------------------------------

def is_finished(folder: str) -> bool:
    """True for a checkpoint folder whose write completed (it has meta.json and both data files)."""
    return all(os.path.isfile(os.path.join(folder, f)) for f in (META_FILE, EDITOR_FILE, TRAINER_FILE))


def list_checkpoints(checkpoints_dir: str) -> list[tuple[int, str]]:
    """Finished checkpoints in `checkpoints_dir` as (step, path), by step."""
    found = []
    for entry in os.listdir(checkpoints_dir):
        match = _STEP_DIR.match(entry)
        path = os.path.join(checkpoints_dir, entry)
        if match and is_finished(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest(run_or_ckpt_dir: str) -> str:
    """The newest finished checkpoint folder under a run folder, a `checkpoints/` folder, or a step folder.

    A step folder is returned as is (when finished). Otherwise the `latest` pointer wins when it
    names a finished folder, else the finished folder with the highest step.
    """
    path = os.fspath(run_or_ckpt_dir)
    if not os.path.exists(path):
        raise UserError(f"checkpoint path does not exist: {path}")
    if not os.path.isdir(path):
        raise UserError(f"{path} is a file; give a checkpoint folder (step-N), a run folder or "
                        f"a {EDITOR_FILE} file")
    if os.path.isfile(os.path.join(path, META_FILE)) or _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        if not is_finished(path):
            raise UserError(f"{path} is not a finished checkpoint (its write was interrupted or files are "
                            f"missing: it needs {META_FILE}, {EDITOR_FILE} and {TRAINER_FILE}); use an "
                            f"earlier checkpoint or the run folder")
        return path
    ckpt_dir = os.path.join(path, CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_dir):
        ckpt_dir = path
    pointed = _read_latest(ckpt_dir)
    if pointed is not None:
        return pointed
    found = list_checkpoints(ckpt_dir)
    if not found:
        raise UserError(f"no finished checkpoint in {path} (folders without {META_FILE} are interrupted "
                        f"writes and are ignored)")
    return found[-1][1]


def _read_latest(ckpt_dir: str) -> str | None:
    try:
        with open(os.path.join(ckpt_dir, LATEST_FILE), encoding="utf-8") as f:
            name = f.read().strip()
    except OSError:
        return None
    folder = os.path.join(ckpt_dir, name)
    return folder if _STEP_DIR.match(name) and is_finished(folder) else None


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """(checkpoint folder, editor.safetensors path) for any accepted checkpoint path.

    Accepts a step folder, its `editor.safetensors`, a `checkpoints/` folder (or its `latest` file)
    or a run folder.
    A lone `.safetensors` file outside a step folder is accepted too (folder = its parent).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.basename(path) == LATEST_FILE:
        path = os.path.dirname(os.path.abspath(path))  # checkpoints/latest -> the folder it points into
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise UserError(f"{path} is not a checkpoint: give a step-N folder, a run folder or an "
                            f"{EDITOR_FILE} file")
        return os.path.dirname(os.path.abspath(path)), path
    folder = find_latest(path)
    return folder, os.path.join(folder, EDITOR_FILE)


def read_meta(folder: str) -> dict:
    """meta.json of a checkpoint folder ({} when absent or unreadable: it is informative only)."""
    try:
        with open(os.path.join(folder, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------------
# Pinning: one concrete checkpoint, resolved once
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PinnedCheckpoint:
    """A checkpoint path resolved once to what it names on disk now (a later `latest` cannot move it).

    kind "step": a step folder (`path`), its weights in `file` = `path/editor.safetensors`;
    kind "safetensors": a lone .safetensors file (`path` = `file`);
    kind "authors": the authors' torch.save file (`path` = `file`), its tensors read into `tensors`.
    `meta` is meta.json (step folders) merged over the safetensors header metadata; {} for the
    authors' files, which record neither editor, backbone nor config.
    """

    path: str
    file: str
    kind: str
    meta: dict
    tensors: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def editor(self) -> str | None:
        return self.meta.get("editor") or None

    @property
    def backbone(self) -> str | None:
        return self.meta.get("backbone") or None

    @property
    def editor_config(self) -> dict | None:
        config = self.meta.get("editor_config")
        return config if isinstance(config, dict) else None

    @property
    def described_by(self) -> str:
        """Where editor / backbone / config were read from, for messages."""
        return os.path.join(self.path, META_FILE) if self.kind == "step" else self.file


def locate_checkpoint(path: str) -> tuple[str, str, str]:
    """(kind, real path, weights file) of any accepted checkpoint path; reads no weights.

    A run folder, a `checkpoints/` folder or its `latest` file become the real path of the step
    folder named now; an `editor.safetensors` inside a finished step folder becomes that folder.
    Any other file is a lone .safetensors file or (any other name) the authors' torch.save format.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint path does not exist: {path}")
    if os.path.isfile(path) and os.path.basename(path) == LATEST_FILE:
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path):
        real = os.path.realpath(path)
        folder = os.path.dirname(real)
        if os.path.basename(real) == EDITOR_FILE and is_finished(folder):
            return "step", folder, real
        return ("safetensors" if real.endswith(".safetensors") else "authors"), real, real
    folder = os.path.realpath(find_latest(path))
    return "step", folder, os.path.join(folder, EDITOR_FILE)


def pin_checkpoint(path: str) -> PinnedCheckpoint:
    """Resolve `path` once and read what describes it (meta.json, header; the authors' tensors).

    Cheap: no safetensors weights are read. An authors' file is opened with
    `torch.load(weights_only=True, mmap=True)` here, so a file that needs unpickling of arbitrary
    objects is refused before any backbone is loaded.
    """
    kind, real, file = locate_checkpoint(path)
    if kind == "authors":
        from editors.authors_checkpoint import read_authors_file

        return PinnedCheckpoint(real, file, kind, {}, read_authors_file(file))
    meta = {**_header_metadata(file), **(read_meta(real) if kind == "step" else {})}
    return PinnedCheckpoint(real, file, kind, meta)


def _header_metadata(file: str) -> dict:
    """The string metadata in a safetensors header ({} when unreadable: loading reports that)."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - a corrupt file is reported when its tensors are read
        return {}


def check_checkpoint_fits(pinned: PinnedCheckpoint, editor_name: str, backbone: str) -> None:
    """Refuse a checkpoint recorded for another editor or another backbone (its tensors might fit)."""
    editor_name = editor_name.strip().lower()
    if pinned.editor is not None and pinned.editor != editor_name:
        raise UserError(f"checkpoint {pinned.path} was trained for editor {pinned.editor}, not {editor_name} "
                        f"({pinned.described_by}); evaluate it with -en {pinned.editor} or give a {editor_name} "
                        f"checkpoint")
    if pinned.backbone is not None and pinned.backbone != backbone:
        raise UserError(f"checkpoint {pinned.path} was trained on backbone {pinned.backbone}, not {backbone} "
                        f"({pinned.described_by}); use -mn {pinned.backbone} or a checkpoint trained on {backbone}")


def config_differences(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (nested dicts are walked)."""
    saved, given = json.loads(json.dumps(saved, default=str)), json.loads(json.dumps(given, default=str))
    keys = []
    for key in sorted(set(saved) | set(given)):
        a, b = saved.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def read_editor_file(file: str) -> dict[str, torch.Tensor]:
    """The tensors of an editor.safetensors file; a truncated or corrupt file is a UserError."""
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except FileNotFoundError as exc:
        raise UserError(f"checkpoint file not found: {file}") from exc
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError on bad bytes
        raise UserError(f"{file} is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc}); "
                        f"use another checkpoint (e.g. the run folder's previous step-N)") from exc


def load_editor_weights(editor, path: "str | PinnedCheckpoint") -> str:
    """Load trained weights into `editor`'s trainable modules; returns the file that was read.

    `path` is a step folder, its editor.safetensors, a run folder (its latest checkpoint), the
    authors' torch.save file, or a `PinnedCheckpoint`. A checkpoint recorded for another editor or
    backbone is refused; every key must be present with the right shape, otherwise one UserError
    lists the missing, unexpected and mis-shaped keys.
    """
    if not callable(getattr(editor, "trainable_modules", None)):
        raise UserError(f"editor {editor.name} has no trained modules, so it takes no checkpoint")
    pinned = path if isinstance(path, PinnedCheckpoint) else pin_checkpoint(path)
    backbone = getattr(getattr(editor, "vllm", None), "name", None)
    check_checkpoint_fits(pinned, editor.name, backbone if backbone is not None else pinned.backbone)
    loaded = pinned.tensors if pinned.tensors is not None else read_editor_file(pinned.file)
    modules = editor.trainable_modules()
    expected = {f"{name}.{key}": (name, key, value) for name, module in modules.items()
                for key, value in module.state_dict().items()}
    problems = _key_problems(editor, loaded, expected)
    if problems:
        raise UserError(f"checkpoint {pinned.file} does not fit this editor: " + "; ".join(problems)
                        + _trained_for(pinned, editor))
    per_module: dict[str, dict] = {name: {} for name in modules}
    for full_key, (name, key, _) in expected.items():
        per_module[name][key] = loaded[full_key]
    with torch.no_grad():
        for name, module in modules.items():
            module.load_state_dict(per_module[name], strict=True)
    return pinned.file


def _key_problems(editor, loaded: dict, expected: dict) -> list[str]:
    """Human-readable mismatches between checkpoint tensors and the editor's state dicts."""
    backbone = getattr(getattr(editor, "vllm", None), "name", "?")
    problems = []
    for full_key, (_, _, value) in expected.items():
        if full_key in loaded and tuple(loaded[full_key].shape) != tuple(value.shape):
            problems.append(f"checkpoint key {full_key} has shape {list(loaded[full_key].shape)} but this editor "
                            f"({backbone}) expects {list(value.shape)}")
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    return problems


def _short_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" (and {more} more)" if more > 0 else "")


def _trained_for(pinned: PinnedCheckpoint, editor) -> str:
    if pinned.kind == "authors":
        return ("; the authors' files record no config: the editor was built from the YAML, which must be "
                "the one the file was trained with (pass --config)")
    if not pinned.meta:
        return f"; was it trained for editor {editor.name} on this backbone?"
    return (f"; the checkpoint was trained for {pinned.backbone or '?'} with editor "
            f"{pinned.editor or '?'} ({pinned.described_by})")


def load_trainer_state(path: str) -> dict:
    """The trainer state of a checkpoint (optimizer, scheduler, step, epoch, ema_loss, ...).

    `path` is a step folder, its editor.safetensors, or a run folder (its latest checkpoint).
    """
    folder, _ = resolve_checkpoint(path)
    file = os.path.join(folder, TRAINER_FILE)
    if not os.path.isfile(file):
        raise UserError(f"{folder} has no {TRAINER_FILE}: it holds weights only, so training cannot resume "
                        f"from it (evaluation can still load it)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{file} is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc}); "
                        f"resume from another checkpoint") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise UserError(f"{file} is not a trainer state written by this tool (no 'step')")
    return state


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler: Any, state: dict, where: str) -> None:
    """Load optimizer / scheduler state dicts from a trainer state; mismatches are UserErrors."""
    try:
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"the optimizer state in {where} does not fit this editor's optimizer ({exc}); "
                        f"was it trained with another editor config?") from exc


__all__ = ["save_checkpoint", "load_editor_weights", "load_trainer_state", "find_latest", "resolve_checkpoint",
           "read_meta", "restore_optimizer", "list_checkpoints", "checkpoint_name", "editor_state_dict",
           "is_finished", "write_latest", "PinnedCheckpoint", "pin_checkpoint", "locate_checkpoint",
           "check_checkpoint_fits", "config_differences", "CHECKPOINTS_DIR", "EDITOR_FILE", "TRAINER_FILE",
           "META_FILE", "LATEST_FILE"]


if __name__ == "__main__":  # python -m editors.checkpoint convert <authors.pt> <out step folder> --backbone <name>
    from editors.authors_checkpoint import main

    sys.exit(main())
