"""Cheap checks of weight files before an expensive load: every shard present, none truncated.

A 7B model takes minutes to read; a missing or half-copied shard must be reported before that, in
one line naming the file. Nothing here reads tensor data:
- `.safetensors`: the 8-byte header length and the JSON header give every tensor's byte range, so
  the file size tells whether the file is complete; the header also lists the keys;
- `.bin` / `.pth` (torch's zip format): the zip directory at the end of the file gives every
  member's offset and size; a checkpoint's keys come from `torch.load(mmap=True, weights_only=True)`, which maps
  the storages instead of reading them (and runs no pickled code).
"""
from __future__ import annotations

import json
import os
import struct
import zipfile

import torch

from utils.errors import UserError
from utils.io import read_json

# What `from_pretrained` looks for, in its order of preference: (index file, single file).
HF_WEIGHT_LAYOUTS = (("model.safetensors.index.json", "model.safetensors"),
                     ("pytorch_model.bin.index.json", "pytorch_model.bin"))
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch.save before zip (<1.6)
_REFETCH = "copy or download it again"


def hf_weight_files(folder: str) -> list[str]:
    """The weight files `from_pretrained(folder)` will read, each checked present and complete.

    An index json (`model.safetensors.index.json` / `pytorch_model.bin.index.json`) must name
    shards that all exist. Raises UserError naming the folder or the file otherwise.
    """
    for index_name, single_name in HF_WEIGHT_LAYOUTS:
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            return [check_weight_file(p, f"named in {index_name}") for p in _shards_of(index)]
        if os.path.isfile(os.path.join(folder, single_name)):
            return [check_weight_file(os.path.join(folder, single_name))]
    expected = ", ".join(name for layout in HF_WEIGHT_LAYOUTS for name in layout)
    raise UserError(f"no weights in {folder}: expected one of {expected}; is this the model folder?")


def _shards_of(index: str) -> list[str]:
    table = read_json(index, hint="copy the model folder again")
    weight_map = table.get("weight_map") if isinstance(table, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index} has no 'weight_map' of tensor names to shard files; copy the model folder again")
    folder = os.path.dirname(index)
    return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]


def check_weight_file(path: str, why: str = "") -> str:
    """`path` if it exists and is complete (safetensors or torch zip); else a UserError naming it."""
    where = f" ({why})" if why else ""
    if not os.path.isfile(path):
        raise UserError(f"weight file missing: {path}{where}; {_REFETCH}")
    if path.endswith(".safetensors"):
        _safetensors_header(path)
    else:
        _check_torch_zip(path)
    return path


def _safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, after checking the file holds every byte it lists."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UserError(f"weight file truncated or not safetensors: {path} ({size} bytes); {_REFETCH}")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"weight file has a corrupt safetensors header: {path}; {_REFETCH}") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    needed = 8 + n + max(ends, default=0)
    if size < needed:
        raise UserError(f"weight file truncated: {path} has {size} of {needed} bytes; {_REFETCH}")
    return header


def _check_torch_zip(path: str) -> None:
    """A torch zip checkpoint whose directory and members all lie inside the file."""
    with open(path, "rb") as f:
        magic = f.read(len(_LEGACY_TORCH_MAGIC))
    if magic == _LEGACY_TORCH_MAGIC:
        return  # the pre-1.6 format has no directory to check cheaply; a bad file fails at load
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"weight file truncated or not a PyTorch checkpoint: {path} ({size} bytes); "
                        f"{_REFETCH}") from None
    # a member's local header (30 bytes + name + extra field) precedes its data; extra <= 64 KiB
    short = [i.filename for i in infos if i.header_offset + 30 + len(i.filename) + i.compress_size > size]
    if short:
        raise UserError(f"weight file truncated: {path} ends inside {short[0]}; {_REFETCH}")


def read_torch_state(path: str) -> dict[str, torch.Tensor]:
    """A torch checkpoint's state dict (`{'model': {...}}` unwrapped), memory-mapped where possible.

    `weights_only=True`: no pickled code runs. Tensors of a zip-format file are mapped, not read,
    until used; cast them as they are needed (`value.to(dtype)`) to read each one once.
    """
    check_weight_file(path)
    with open(path, "rb") as f:
        mappable = f.read(len(_LEGACY_TORCH_MAGIC)) != _LEGACY_TORCH_MAGIC  # the pre-1.6 format cannot be mapped
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mappable)
    except Exception as exc:  # pickled code, not a torch file
        raise UserError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors (nor {{'model': state_dict}})")
    return state

