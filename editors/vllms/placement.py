"""Where a backbone's modules run when one process spreads it over several devices (`--device_map`).

A device map is {module name in `vllm.model`: device}; "" names the whole model. Backbones stored as
one Hugging Face folder (BLIP-2, LLaVA) are read with transformers' `from_pretrained(device_map=...)`,
each weight straight onto its device; backbones built in memory (MiniGPT-4, tiny models) are placed
afterwards with accelerate's `dispatch_model`. Either way accelerate hooks move a module's inputs to
its device, so the layers of a stack run one after another across devices; `execution_device` reads
where a module runs.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from utils.errors import UserError


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its accelerate hook's device if it has one, else its first weight's."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def planned_device(name: str, device_map: dict[str, str]) -> str | None:
    """The device `device_map` gives the module or weight `name`: that of the longest key that is `name` or a
    module above it ("" is above everything); None when no key covers it."""
    keys = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    return device_map[max(keys, key=len)] if keys else None


def check_module_names(model: nn.Module, device_map: dict[str, str], source: str) -> None:
    """Every key of `device_map` names a module or weight of `model`, and every weight falls under one key;
    otherwise one UserError naming the key (or the first unplaced weight) and `source`."""
    names = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
    unknown = [key for key in device_map if key not in names]
    if unknown:
        tops = sorted({name.split(".")[0] for name in names if name})
        raise UserError(f"{source}: {unknown[0]!r} is not a module of this backbone (top-level modules: "
                        f"{', '.join(tops)}; layer names as in `model.named_modules()`)")
    for name, _ in model.named_parameters():
        if planned_device(name, device_map) is None:
            raise UserError(f"{source}: no device for the weight {name!r}; add its module (or a module above "
                            f"it, \"\" for the whole model) to the map")


def no_split_classes(model: nn.Module) -> list[str]:
    """Class names `auto` keeps whole on one device: the decoder / encoder layers of every transformers part."""
    found: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in found:
                found.append(name)
    return found


def dispatch(model: nn.Module, device_map: str | dict[str, str], dtype: torch.dtype | None) -> dict[str, str]:
    """Place an in-memory `model` by `device_map` ("auto" or a checked dict); returns the map used."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import set_module_tensor_to_device

    if device_map == "auto":
        device_map = infer_auto_device_map(model, no_split_module_classes=no_split_classes(model), dtype=dtype)
        device_map = {k: (f"cuda:{v}" if isinstance(v, int) else v) for k, v in device_map.items()}
        if any(v in ("disk", "meta") for v in device_map.values()):
            raise UserError("--device_map auto: the backbone does not fit in the GPUs and CPU memory of this "
                            "machine (accelerate would offload it to disk, which is not supported)")
    modules = {name for name, _ in model.named_modules()}
    for key, device in device_map.items():  # a weight named directly (e.g. MiniGPT-4's query_tokens): moved here,
        if key not in modules:                # accelerate's hooks only move modules
            set_module_tensor_to_device(model, key, device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        dispatch_model(model, device_map=device_map)
    model.hf_device_map = dict(device_map)
    return model.hf_device_map
