"""Where a result came from: the git commit of the checkout and the machine (CPU model, cores, AVX-512).

Float results differ between CPU kernel families, so every generated table names its machine.
"""
from __future__ import annotations

import os
import platform
import subprocess


def commit() -> str:
    """The short hash of HEAD, marked when tracked files outside records/ have uncommitted changes (the
    runners' results under records/ change as their jobs finish)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!records"], capture_output=True, text=True).stdout
        return head + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def machine() -> str:
    """`<CPU model>, <n> cores[, AVX-512]`."""
    if not os.path.isfile("/proc/cpuinfo"):
        return f"{platform.processor()}, {os.cpu_count()} cores"
    text = open("/proc/cpuinfo").read()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores{', AVX-512' if ' avx512f' in text else ''}"
