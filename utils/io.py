"""Files and randomness, one way each: atomic writes, JSON reading, seeding, the 'none' convention.

Atomic writes go to a hidden temporary sibling (`.<name>.tmp-<pid>-<token>`), are flushed and
fsynced, then renamed over the target; on any failure (including Ctrl-C) the temporary file or
folder is removed, so a reader sees the old content or the new one, never half of it.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import uuid
from typing import Callable, Iterator

import numpy as np
import torch
import yaml

from utils.errors import UserError


def _temporary_sibling(path: str, kind: str = "tmp") -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_path(path: str) -> None:
    """Flush a written file (or a folder's entries) to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not fsync folders
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to create the file, then move it into place at `path`."""
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def write_json_atomic(path: str, obj, indent: int | None = 4, default=None) -> None:
    """`default` as in json.dumps (e.g. `str` for values JSON has no type for)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=default))


def write_yaml_atomic(path: str, obj) -> None:
    write_text_atomic(path, yaml.safe_dump(obj, sort_keys=False))


@contextlib.contextmanager
def folder_atomic(path: str) -> Iterator[str]:
    """Yield a temporary folder to fill; on success it replaces `path` (an old `path` is moved aside,
    then deleted); on failure it is deleted and `path` is untouched."""
    tmp = _temporary_sibling(path)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_path(tmp)
        old = None
        if os.path.lexists(path):
            old = _temporary_sibling(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str, hint: str = ""):
    """The JSON in `path`; an empty or corrupt file is a UserError naming it (plus `hint`)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is empty or corrupt ({exc.msg} at line {exc.lineno})"
                        + (f"; {hint}" if hint else "")) from None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def none_or_value(value: str | None) -> str | None:
    """'none' / 'None' / '' -> None (the paper's convention for -lkpt and -ckpt), else `value`."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    return value
