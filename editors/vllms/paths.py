"""Where real weights live: flag > environment variable > YAML file of paths (never a source edit).

Backbones (`--model_path`) and the baselines' auxiliary models (`--aux_model_path NAME=PATH`:
bert-base-cased, opt-125m, roberta-base, multi-qa-mpnet-base-dot-v1) are found the same way, by
`resolve_model_path`; the auxiliary flag's values reach it through `set_aux_flag_paths`, which the
run entry points call once with what the command line gave.
"""
from __future__ import annotations

import os

import yaml

from utils.errors import UserError

PATHS_FILE_ENV = "LIVEEDIT_MODEL_PATHS"
DEFAULT_PATHS_FILE = os.path.join("configs", "model_paths.yaml")


def env_var(full_name: str) -> str:
    """`blip2-opt-2.7b` -> `LIVEEDIT_BLIP2_OPT_2_7B_PATH`."""
    return "LIVEEDIT_" + "".join(c if c.isalnum() else "_" for c in full_name.upper()) + "_PATH"


AUX_FLAG = "--aux_model_path"
_aux_flag_paths: dict[str, str] = {}  # name -> folder, from this process's --aux_model_path flags


def parse_aux_flags(values) -> dict[str, str]:
    """`["bert-base-cased=/m/bert", ...]` -> {name: folder}; a value without `=` is a UserError."""
    table = {}
    for value in values or []:
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UserError(f"{AUX_FLAG} takes NAME=FOLDER (e.g. bert-base-cased=/models/bert-base-cased), "
                            f"got {value!r}")
        table[name.strip()] = folder.strip()
    return table


def set_aux_flag_paths(values) -> None:
    """Remember this run's `--aux_model_path NAME=FOLDER` values (replacing earlier ones)."""
    table = parse_aux_flags(values)
    _aux_flag_paths.clear()
    _aux_flag_paths.update(table)


def aux_flag_path(full_name: str) -> str | None:
    """The folder `--aux_model_path` gave for `full_name` in this run, or None."""
    return _aux_flag_paths.get(full_name)


def resolve_aux_path(full_name: str) -> str:
    """The local folder of auxiliary model `full_name` (flag > env var > paths YAML)."""
    return resolve_model_path(full_name, _aux_flag_paths.get(full_name), flag_name=AUX_FLAG,
                              flag_example=f"{AUX_FLAG} {full_name}=/path/to/{full_name}")


def resolve_model_path(full_name: str, flag_value: str | None = None, flag_name: str = "--model_path",
                       flag_example: str | None = None) -> str:
    """The local weight folder of `full_name`, from the flag, the env var or the paths YAML."""
    paths_file = os.environ.get(PATHS_FILE_ENV, DEFAULT_PATHS_FILE)
    path, source = flag_value, flag_name
    if not path and os.environ.get(env_var(full_name)):
        path, source = os.environ[env_var(full_name)], f"${env_var(full_name)}"
    if not path and os.path.isfile(paths_file):
        with open(paths_file) as f:
            table = yaml.safe_load(f) or {}
        if not isinstance(table, dict):
            raise UserError(f"{paths_file} must map model names to folders, e.g. '{full_name}: /models/...'")
        path, source = table.get(full_name), paths_file
    if not path:
        raise UserError(
            f"no local weights for {full_name}. Set one of:\n"
            f"  1. the flag {flag_example or f'{flag_name} /path/to/{full_name}'}\n"
            f"  2. the environment variable {env_var(full_name)}=/path/to/{full_name}\n"
            f"  3. a line '{full_name}: /path/to/{full_name}' in {paths_file} "
            f"(or in the YAML file named by ${PATHS_FILE_ENV})")
    if not os.path.isdir(path):
        raise UserError(f"model folder for {full_name} does not exist: {path} (from {source})")
    return path
