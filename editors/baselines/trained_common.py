"""What the trained baselines (SERAC, RECIPE, LTE) share in training: drawing a record's samples
and the per-sample losses on label positions (the LiveEdit conventions: token mean per sample,
then mean over samples)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.records import EditRecord

REL, GEN, LOC = "rel", "gen", "loc"


def draw_samples(records: list[EditRecord], rng: np.random.Generator, image_loc_only: bool = False) -> dict:
    """{(kind, type): [one Sample per record]}: the edit request (rel), one item of each generality
    type (gen) and of each locality type (loc; only those with an image if `image_loc_only`),
    picked with `rng` (the types are those the first record has)."""
    def pick(items):
        return items[int(rng.integers(len(items)))]

    first = records[0]
    out = {(REL, ""): [pick(r.requests) for r in records]}
    for t, items in first.generality.items():
        if items:
            out[(GEN, t)] = [pick(r.generality[t]) for r in records]
    for t, items in first.locality.items():
        if items and not (image_loc_only and items[0].image is None):
            out[(LOC, t)] = [pick(r.locality[t]) for r in records]
    return out


def per_sample_mean(values: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Token values [n] (in label_mask order) -> mean over each sample's tokens, then over samples."""
    row_of_token = label_mask.nonzero()[:, 0]  # [n]
    sums = torch.zeros(label_mask.shape[0], device=values.device).index_add(0, row_of_token, values)
    return (sums / label_mask.sum(1).clamp(min=1)).mean()


def nll(logits: torch.Tensor, batch) -> torch.Tensor:
    """Mean NLL of the targets: logits [n, V] on `batch.label_mask` positions."""
    labels = batch.labels[batch.label_mask]  # [n]
    return per_sample_mean(F.cross_entropy(logits.float(), labels, reduction="none"), batch.label_mask)


def kl(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q) over label positions: both [n, V] log-probabilities."""
    return per_sample_mean((p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(-1), label_mask)


@torch.no_grad()
def unedited_logprobs(vllm, batch) -> torch.Tensor:
    """Log-probabilities [n, V] of the unedited backbone on `batch`'s label positions."""
    with vllm.unedited():
        return vllm(batch)[batch.label_mask].float().log_softmax(-1)


def logits_after_last_layer(vllm, hidden: torch.Tensor, batch) -> torch.Tensor:
    """The backbone's final norm and LM head on a last-layer output `hidden` [b, l, D] -> [n, V] at
    `batch.label_mask` positions."""
    final = vllm.stack.run_from(hidden, batch.attention_mask, batch.position_ids, vllm.num_layers)
    return vllm.stack.lm_head(final[batch.label_mask])  # [n, V]


def real_rows(embeds: torch.Tensor, mask: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
    """Per row, the embeddings [n_i, D] where `mask` [b, l] is set (the last `last` of them if given)."""
    rows = []
    for e, m in zip(embeds, mask.bool()):
        r = e[m]
        rows.append(r[-last:] if last is not None else r)
    return rows


def pack(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n_i, D] -> right-padded [b, max n, D] and mask [b, max n] (differentiable)."""
    length = max(max(len(r) for r in rows), 1)
    packed = torch.stack([torch.cat([r, r.new_zeros(length - len(r), r.shape[-1])]) for r in rows])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=packed.device)
    for i, r in enumerate(rows):
        mask[i, :len(r)] = 1
    return packed, mask
