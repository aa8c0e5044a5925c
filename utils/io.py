"""Files and randomness, one way each: atomic writes, JSON reading, folder locks, seeding, 'none'.

Atomic writes go to a hidden temporary sibling (`.<name>.tmp-<pid>-<token>`), are flushed and
fsynced, then renamed over the target (and the folder entry is fsynced too); on any failure
(including Ctrl-C) the temporary file or folder is removed, so a reader sees the old content or
the new one, never half of it. A write that fails with an OSError (read-only or full disk, a file
where a folder should be) is a `UserError` "cannot write <path>: <reason>".

`folder_lock` keeps two processes from writing one results folder at the same time.
"""
from __future__ import annotations

import contextlib
import errno
import json
import numbers
import os
import random
import shutil
import socket
import sys
import time
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


def cannot_write(path: str, exc: OSError) -> UserError:
    """The one-line UserError for an OSError met while writing `path`."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, (NotADirectoryError, FileExistsError)) or exc.errno in (errno.ENOTDIR, errno.EEXIST):
        reason += " (a file stands where a folder is needed)"
    return UserError(f"cannot write {path}: {reason}")


def os_error_line(exc: OSError) -> str:
    """'cannot write <path>: <reason>' for an OSError that reached a script's main() (no traceback)."""
    path = exc.filename if exc.filename is not None else "a file"
    return str(cannot_write(os.fspath(path) if isinstance(path, os.PathLike) else str(path), exc))


def make_folder(path: str) -> str:
    """`os.makedirs(path, exist_ok=True)`; an OSError is a `UserError` naming the path."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    return path


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` to create the file, then move it into place at `path`.

    The temporary file is removed on any failure; an OSError becomes a `UserError` naming `path`.
    """
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))  # the rename itself survives a crash
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise cannot_write(path, exc) from None
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
    try:
        os.makedirs(tmp)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    try:
        yield tmp
        fsync_path(tmp)
        old = None
        if os.path.lexists(path):
            old = _temporary_sibling(path, "old")
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise cannot_write(path, exc) from None
        raise


def read_json(path: str, hint: str = "", kind: type | None = None):
    """The JSON in `path`; an empty, corrupt or unreadable file is a UserError naming it (plus `hint`).

    With `kind` (e.g. `dict`), a file whose top-level value is of another type is corrupt too.
    """
    tail = f"; {hint}" if hint else ""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is empty or corrupt ({exc.msg} at line {exc.lineno}){tail}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is corrupt (not UTF-8 text){tail}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}{tail}") from None
    if kind is not None and not isinstance(data, kind):
        raise UserError(f"{path} is corrupt (it holds a JSON {type(data).__name__}, not an object){tail}")
    return data


# ---- folder locks -------------------------------------------------------------------------------

LOCK_FILE = ".lock"
_STALE_EMPTY_LOCK_S = 60.0  # a lock file still empty after this long was left by a crash at creation


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_lock(path: str, token: str) -> bool:
    """Create the lock file with O_CREAT | O_EXCL; False when it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise cannot_write(path, exc) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token}
    try:
        os.write(fd, json.dumps(holder).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _lock_holder(path: str) -> dict | None:
    """The holder recorded in an existing lock file (None: gone, empty or unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _stale_reason(path: str, holder: dict | None) -> str | None:
    """Why the lock at `path` may be taken over, or None when its holder may still be running."""
    if holder is None:
        with contextlib.suppress(OSError):
            if time.time() - os.path.getmtime(path) > _STALE_EMPTY_LOCK_S:
                return "its lock file is empty or unreadable and old"
        return None
    if holder.get("host") == socket.gethostname() and not _pid_alive(holder["pid"]):
        return f"process {holder['pid']} that held it is no longer running"
    return None


@contextlib.contextmanager
def folder_lock(folder: str, what: str = "another run") -> Iterator[str]:
    """Hold `<folder>/.lock` while the body runs: a second holder is refused with a `UserError`.

    The lock file holds the pid, host and start time of its holder and is removed on exit (also on
    exceptions and Ctrl-C). A lock left by a dead process of this host is taken over with a note on
    stderr; a lock of a live process, or of another host, is refused, naming it.
    """
    make_folder(folder)
    path = os.path.join(folder, LOCK_FILE)
    token = uuid.uuid4().hex
    for _ in range(3):  # retries only after taking over a stale lock that someone else re-took
        if _create_lock(path, token):
            break
        holder = _lock_holder(path)
        if holder == {}:  # released between our attempt and the read
            continue
        reason = _stale_reason(path, holder)
        if reason is None:
            raise _lock_refusal(folder, path, holder, what)
        print(f"note: taking over the lock of {folder}: {reason}", file=sys.stderr)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    else:
        raise _lock_refusal(folder, path, _lock_holder(path), what)
    try:
        yield path
    finally:
        if (_lock_holder(path) or {}).get("token") == token:
            with contextlib.suppress(OSError):
                os.remove(path)


def _lock_refusal(folder: str, path: str, holder: dict | None, what: str) -> UserError:
    if not holder:
        who = "an unknown process (its lock file is empty or unreadable)"
    else:
        who = (f"process {holder['pid']} on host {holder.get('host', '?')}, started "
               f"{holder.get('started_at', '?')}")
    return UserError(f"{folder} is in use by {what}: {who}. Wait for it to finish, write elsewhere, or "
                     f"delete {path} if that process is gone.")


# ---- seeding ------------------------------------------------------------------------------------

SEED_MAX = 2**32 - 1  # numpy's legacy seeding accepts 0..2**32-1; python and torch accept more


def check_seed(seed, flag: str) -> None:
    """Refuse a seed that not all of our seeding accepts; the message names `flag`."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{flag} must be an integer in 0..{SEED_MAX} (2**32-1), got {seed!r}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    check_seed(seed, "the seed")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def none_or_value(value: str | None) -> str | None:
    """'none' / 'None' / '' -> None (the paper's convention for -lkpt and -ckpt), else `value`."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    return value
