"""Device and dtype names from the command line, checked before any model is loaded."""
from __future__ import annotations

import os
import sys

import torch

from utils.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # the --dtype flag's values


def resolve_device(name: str | torch.device) -> torch.device:
    """`cpu`, `cuda`, `cuda:1`, `mps`, `xpu`, `auto` -> a device that exists here, or a UserError saying why not
    (`meta` and device types this project does not run on are refused too)."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r} (use cpu, cuda, cuda:N, mps, xpu or auto)") from exc
    if device.type == "meta":
        raise UserError(f"device {name} holds no data (shapes only) and cannot run a model; use cpu or cuda")
    if device.type in ("mps", "xpu") and not _backend_available(device.type):
        raise UserError(f"device {name} requested but this machine has no {device.type.upper()} device "
                        f"(or this torch build lacks it); use -dvc cpu, cuda or auto")
    if device.type in ("mps", "xpu") and device.index:
        count = 1 if device.type == "mps" else torch.xpu.device_count()
        if device.index >= count:
            raise UserError(f"device {name} does not exist: this machine has {count} {device.type.upper()} "
                            f"device(s) ({device.type}:0..{device.type}:{count - 1})")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"device {name} is not supported (use cpu, cuda, cuda:N, mps, xpu or auto)")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"device {name} requested but this machine has no CUDA GPU; use -dvc cpu")
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name} does not exist: this machine has {count} CUDA GPU(s) "
                            f"(cuda:0..cuda:{count - 1})")
    return device


def _backend_available(kind: str) -> bool:
    """Whether torch can use the `mps` or `xpu` backend on this machine."""
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend is not None and backend.is_available())
    module = getattr(torch, kind, None)
    return bool(module is not None and module.is_available())


def auto_dtype(device: torch.device) -> torch.dtype:
    """`--dtype auto`: bfloat16 on a CUDA device that computes in it natively, float32 elsewhere (CPU, MPS)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return torch.bfloat16
    return torch.float32


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype | None:
    """`float32` / `bfloat16` / `float16` (or fp32 / bf16 / fp16) -> torch dtype; None stays None.

    `auto` needs the device it will run on (see `auto_dtype`); without one it means the CPU.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.strip().lower()
    if key == "auto":
        return auto_dtype(resolve_device(device if device is not None else "cpu"))
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[key]


def tune_cpu_threads(model_name: str, device: torch.device) -> None:
    """One intra-op thread for tiny backbones on CPU.

    Measured on this project's 2-core AMD EPYC machines: with 2 threads, MKL spends 10-15 ms on
    the first GEMM of every new shape, and a tiny model's padded lengths change every batch, so
    a LiveEdit training step took ~1.5 s instead of ~0.2 s (docs/PERFORMANCE.md). Real models
    keep torch's default.
    """
    if device.type == "cpu" and model_name.startswith("tiny-"):
        torch.set_num_threads(1)


# ---- device maps: one backbone over several devices of one process ------------------------------

DEVICE_MAP_HELP = ("none (everything on -dvc), auto (spread the backbone over the visible GPUs; on a machine "
                   "without CUDA it falls back to -dvc) or a JSON file {module name: device}")
NOT_RUNNABLE = ("disk", "meta")  # accelerate's offload targets: this project runs every module where it sits


def parse_device_map(value: str | dict | None, flag: str = "--device_map") -> str | dict[str, str] | None:
    """`--device_map` -> None (no map), "auto", or {module name: device name} read from a JSON file.

    Every device the file names must exist on this machine (`resolve_device`'s checks); accelerate's
    integer shorthand `0` means `cuda:0`. Each problem is one UserError naming `flag`, the file, the
    module and the device.
    """
    if value is None or isinstance(value, dict):
        return None if value is None else _checked_map(value, flag, "the device map")
    key = str(value).strip()
    if key.lower() in ("", "none"):
        return None
    if key.lower() == "auto":
        return "auto"
    from utils.io import read_json

    if not os.path.isfile(key):
        raise UserError(f"{flag} {key}: no such file; give none, auto or a JSON file {{module name: device}}")
    return _checked_map(read_json(key, hint=f"{flag} needs a JSON object {{module name: device}}", kind=dict),
                        flag, key)


def _checked_map(raw: dict, flag: str, source: str) -> dict[str, str]:
    if not raw:
        raise UserError(f"{flag} {source}: the map is empty; name at least one module (\"\" = the whole model)")
    out = {}
    for module, device in raw.items():
        if isinstance(device, bool) or not isinstance(device, (str, int)):
            raise UserError(f"{flag} {source}: module {module!r} has device {device!r}; use a name such as "
                            f"\"cuda:0\" or \"cpu\"")
        name = f"cuda:{device}" if isinstance(device, int) else device.strip().lower()
        if name in NOT_RUNNABLE:
            raise UserError(f"{flag} {source}: module {module!r} is placed on {name!r}; offloading is not "
                            f"supported, place every module on cpu or a GPU")
        try:
            resolved = resolve_device(name)
        except UserError as exc:
            raise UserError(f"{flag} {source}: module {module!r} is placed on {name}: {exc}") from None
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", 0)
        out[str(module)] = str(resolved)
    return out


def resolve_device_map(value: str | dict | None, device: torch.device, flag: str = "--device_map",
                       say=None) -> str | dict[str, str] | None:
    """The map a backbone is loaded with: `parse_device_map`, except that `auto` on a machine without a
    CUDA GPU gives None (everything on `device`) and says so through `say` (default: a note on stderr)."""
    parsed = parse_device_map(value, flag)
    if parsed == "auto" and not torch.cuda.is_available():
        (say or _note)(f"note: {flag} auto: this machine has no CUDA GPU, the whole backbone runs on {device}")
        return None
    return parsed


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
