"""Where real weights live: flag > environment variable > YAML file of paths (never a source edit)."""
from __future__ import annotations

import os

import yaml

from utils.errors import UserError

PATHS_FILE_ENV = "LIVEEDIT_MODEL_PATHS"
DEFAULT_PATHS_FILE = os.path.join("configs", "model_paths.yaml")


def env_var(full_name: str) -> str:
    """`blip2-opt-2.7b` -> `LIVEEDIT_BLIP2_OPT_2_7B_PATH`."""
    return "LIVEEDIT_" + "".join(c if c.isalnum() else "_" for c in full_name.upper()) + "_PATH"


def resolve_model_path(full_name: str, flag_value: str | None = None) -> str:
    """The local weight folder of `full_name`, from the flag, the env var or the paths YAML."""
    paths_file = os.environ.get(PATHS_FILE_ENV, DEFAULT_PATHS_FILE)
    path, source = flag_value, "--model_path"
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
            f"  1. the flag --model_path /path/to/{full_name}\n"
            f"  2. the environment variable {env_var(full_name)}=/path/to/{full_name}\n"
            f"  3. a line '{full_name}: /path/to/{full_name}' in {paths_file} "
            f"(or in the YAML file named by ${PATHS_FILE_ENV})")
    if not os.path.isdir(path):
        raise UserError(f"model folder for {full_name} does not exist: {path} (from {source})")
    return path
