"""Routing and the mixture-of-experts residual, shared by inference and training (spec §6.6).

All functions are batched; memory is flat in the number of experts m: similarities are one
matrix product [b, e*md] x [e*md, m], and the residual is two matrix products through the
[b, l, m*r] expert activations (never an [l, m, d] intermediate).
"""
from __future__ import annotations

import torch

CAST_CHUNK_ELEMENTS = 2 ** 22  # keys cast to a full-precision dtype at a time (16 MiB in float32)


def similarity(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """mean over the e feature tokens of <a_e, b_e> * scale: a [n, e, md], b [m, e, md] -> [n, m] in a's dtype.

    A b stored in another dtype (a bfloat16 repository) is cast in chunks of CAST_CHUNK_ELEMENTS,
    so no full-precision copy of all m keys is ever made.
    """
    e, a2 = a.shape[1], a.flatten(1)  # [n, e*md]
    if b.dtype == a.dtype:
        return a2 @ b.flatten(1).transpose(0, 1) * (scale / e)  # [n, m]
    step = max(1, CAST_CHUNK_ELEMENTS // max(b.shape[1:].numel(), 1))  # keys per chunk
    parts = [a2 @ part.flatten(1).transpose(0, 1).to(a.dtype) for part in b.split(step)]  # >= 1 part
    return torch.cat(parts, dim=1) * (scale / e)  # [n, m]


def paired_similarity(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Row-wise version: a, b [n, e, md] -> [n]."""
    return (a * b).sum((1, 2)) * (scale / a.shape[1])  # [n]


def soft_weights(sim: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """c = softmax over the selected experts x sigmoid(sim); 0 elsewhere. sim, selected [b, m] -> [b, m]."""
    logits = sim.masked_fill(~selected, float("-inf"))
    soft = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no expert -> 0
    return soft * torch.sigmoid(sim) * selected  # [b, m]


def mean_weights(selected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """-SR (the paper's Table-2 ablation): each selected expert weighs 1/k, k = the row's selected count;
    rows with none -> 0. selected [b, m] bool -> [b, m] in `dtype`."""
    chosen = selected.to(dtype)  # [b, m]
    return chosen / chosen.sum(dim=-1, keepdim=True).clamp(min=1)  # [b, m]


def mixture_residual(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_m c_m ReLU(U_m x) V_m for every position.

    x [b, l, D] (already layer-normed), up (U) and down (V) [m, r, D], weights [b, m] -> [b, l, D].
    """
    m, r, d = up.shape
    act = (x @ up.reshape(m * r, d).transpose(0, 1)).relu_()  # [b, l, m*r], in place: the largest tensor
    scale = weights.repeat_interleave(r, dim=1)[:, None, :]  # [b, 1, m*r]
    act = act * scale if torch.is_grad_enabled() else act.mul_(scale)  # relu's backward needs act intact
    return act @ down.reshape(m * r, d)  # [b, l, D]


def gather_spans(h: torch.Tensor, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row slices h[i, s_i:e_i] padded to one length: h [b, l, D], spans [b, 2] -> ([b, n, D], mask [b, n])."""
    if h.shape[0] == 1:  # one row needs no padding: a slice (a third of the general path's kernels)
        start, end = spans[0].tolist()
        if end > start:
            return h[:, start:end], torch.ones(1, end - start, dtype=torch.bool, device=h.device)  # [1, n, D]
    lengths = spans[:, 1] - spans[:, 0]  # [b]
    n = max(int(lengths.max()), 1)
    steps = torch.arange(n, device=h.device)  # [n]
    mask = steps[None, :] < lengths[:, None]  # [b, n]
    index = (spans[:, :1] + steps[None, :]).clamp(max=h.shape[1] - 1)  # [b, n]
    out = torch.gather(h, 1, index[..., None].expand(-1, -1, h.shape[-1]))  # [b, n, D]
    return out * mask[..., None], mask
