"""Image inputs of a variable number of tiles per image (LLaVA-OneVision's anyres crops, SmolVLM's
split image), joined over the image rows of a batch for one vision-encoder call.

The processor returns per row tensors shaped [1, tiles, ...]; rows differ in `tiles`, so they are
joined along dim 1 padded with zeros up to the most tiles of any row. Both families' models ignore
the padding tiles: LLaVA-OneVision keeps the first `image_size_to_num_patches(image_sizes)` tiles of a
row, SmolVLM drops tiles that are all zero (what transformers' own batched processor output holds).
"""
from __future__ import annotations

import torch


def join_tiles(extras: list[dict], keys) -> dict:
    """Per-row processor outputs -> one dict of the tensors named in `keys`: [rows, max tiles, ...]
    (zero-padded) for tensors with a tile dimension (ndim > 2), else concatenated along dim 0."""
    joined = {}
    for key in extras[0]:
        if key not in keys or not torch.is_tensor(extras[0][key]):
            continue
        parts = [e[key] for e in extras]
        if parts[0].ndim > 2:  # [1, tiles, ...] per row
            most = max(p.shape[1] for p in parts)
            parts = [torch.cat([p, p.new_zeros(p.shape[0], most - p.shape[1], *p.shape[2:])], dim=1) for p in parts]
        joined[key] = torch.cat(parts)
    return joined
