"""MEND-VL training (spec §7): learn the gradient transforms and the per-module edit learning rates.

One step, for a batch of B records:
  1. (prefetch thread, no grad) every sample of the step — the B edit requests, B of each generality
     type, B of each locality type (text_loc included) — through the frozen backbone as ONE batch up
     to the layer before the first edited one, with every edit off; the locality samples' pre-edit
     log-probabilities on their label positions. Nothing of the backbone is computed twice.
  2. (train_step) the edit signal of the B requests (x, δ per edited module, unedited model), the
     transforms (training mode: the running mean / std take the rows in) and ΔW = x̃ᵀ δ̃ · lr / n_rows
     over the batch's rows — the "edited model" is the backbone with this ΔW.
  3. One pass of the edited layers and above over every sample of the step with ΔW applied:
        loss = rel_lambda · NLL_rel + gen_lambda · Σ_types NLL_gen + loc_lambda · Σ_types KL(pre || post)
     (token means over each group, the authors' label_loss / logit_KL_loss), backward, and the
     gradient of the transforms clipped at `grad_clip` (a non-finite norm is an error).
Adam: transforms at `lr` (1e-6), edit learning rates at `edit_lr_lr` (1e-4); no schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.errors import UserError
from utils.records import EditRecord, Sample

REL, GEN, LOC = "rel", "gen", "loc"


@dataclass
class MENDTrainBatch:
    """Everything of one step that depends only on the frozen backbone."""

    rel_batch: object                 # VLLMBatch of the B edit requests
    rel_hidden: torch.Tensor          # [B, l_rel, D] output of layer first_layer - 1
    batch: object                     # VLLMBatch of all samples: rel, gen types, loc types (B rows each)
    hidden: torch.Tensor              # [N, l, D] output of layer first_layer - 1
    groups: list[tuple[str, str]]     # (kind, type) of each block of B rows, in order
    pre_logprobs: dict[str, torch.Tensor]  # loc type -> [n_tokens, V] pre-edit log-probabilities


def make_optimizer(editor):
    cfg = editor.config
    optimizer = torch.optim.Adam([{"params": list(editor.transforms.parameters()), "lr": cfg.lr},
                                  {"params": list(editor.edit_lrs.parameters()), "lr": cfg.edit_lr_lr}])
    return optimizer, None


@torch.no_grad()
def prepare_training_batch(editor, records: list[EditRecord], rng: np.random.Generator) -> MENDTrainBatch:
    """One sample of each kind per record (picked with `rng`), through the backbone once."""
    vllm, size = editor.vllm, len(records)
    gen_types = [t for t, items in records[0].generality.items() if items]
    loc_types = [t for t, items in records[0].locality.items() if items]
    samples: dict[tuple[str, str], list[Sample]] = {
        (REL, ""): [r.requests[int(rng.integers(len(r.requests)))] for r in records]}
    samples.update({(GEN, t): [r.generality[t][int(rng.integers(len(r.generality[t])))] for r in records]
                    for t in gen_types})
    samples.update({(LOC, t): [r.locality[t][int(rng.integers(len(r.locality[t])))] for r in records]
                    for t in loc_types})
    flat = [s for group in samples.values() for s in group]
    batch = vllm.prepare([s.prompt for s in flat], [s.image for s in flat], [s.target for s in flat])
    layer = editor.first_layer - 1
    with vllm.unedited():
        hidden = vllm.hidden_at_layer(batch, layer)  # [N, l, D]
        pre = {}
        for g, (kind, name) in enumerate(samples):
            if kind == LOC:
                sub = batch.rows(g * size, (g + 1) * size)
                pre[name] = vllm.logits_from_layer(sub, hidden[g * size:(g + 1) * size, :sub.length], layer,
                                                   positions=sub.label_mask).float().log_softmax(-1)  # [n, V]
    rel_batch = batch.rows(0, size)
    return MENDTrainBatch(rel_batch, hidden[:size, :rel_batch.length], batch, hidden, list(samples), pre)


def _token_nll(logits: torch.Tensor, batch) -> torch.Tensor:
    return F.cross_entropy(logits, batch.labels[batch.label_mask])  # token mean over the group


def _token_kl(pre: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(pre || post) per label token, averaged: pre [n, V] log-probs, logits [n, V]."""
    post = logits.log_softmax(-1)
    return (pre.exp() * (pre - post)).sum(-1).mean()


def training_step(editor, batch: MENDTrainBatch) -> dict[str, float]:
    cfg, vllm = editor.config, editor.vllm
    signal = editor.edit_signal(batch.rel_batch, batch.rel_hidden)
    deltas = [None if n == 0 else total / n for total, n in editor.updates(signal)]  # [d_in, d_out] each
    editor._training_deltas = deltas
    try:
        logits = vllm.logits_from_layer(batch.batch, batch.hidden, editor.first_layer - 1,
                                        positions=batch.batch.label_mask).float()  # [n_all, V]
    finally:
        editor._training_deltas = None
    size = batch.rel_batch.size
    tokens = batch.batch.label_mask.sum(1).view(len(batch.groups), size).sum(1).tolist()
    logs: dict[str, float] = {}
    rel_loss = gen_loss = loc_loss = logits.new_zeros(())
    for g, ((kind, name), group_logits) in enumerate(zip(batch.groups, logits.split(tokens))):
        group = batch.batch.rows(g * size, (g + 1) * size)
        if kind == REL:
            rel_loss = _token_nll(group_logits, group)
        elif kind == GEN:
            term = _token_nll(group_logits, group)
            logs[f"Generality loss {name}"] = term.item()
            gen_loss = gen_loss + term
        else:
            term = _token_kl(batch.pre_logprobs[name], group_logits)
            logs[f"Locality loss {name}"] = term.item()
            loc_loss = loc_loss + term
    total = cfg.rel_lambda * rel_loss + cfg.gen_lambda * gen_loss + cfg.loc_lambda * loc_loss
    total.backward()
    grad_norm = clip_gradients(editor)
    logs.update({"Loss": total.item(), "Reliability loss": rel_loss.item(), "Generality loss": gen_loss.item(),
                 "Locality loss": loc_loss.item(), "Grad-Norm": grad_norm,
                 "Edit lr mean": float(torch.stack([p.detach() for p in editor.edit_lrs]).mean())})
    return logs


def clip_gradients(editor) -> float:
    """Clip the transforms' gradient norm at `grad_clip` (the authors'); a non-finite gradient of the
    transforms or of the edit learning rates is a UserError (the optimiser has not stepped yet)."""
    params = [p for p in editor.transforms.parameters() if p.grad is not None]
    try:
        norm = torch.nn.utils.clip_grad_norm_(params, editor.config.grad_clip, error_if_nonfinite=True)
    except RuntimeError as exc:
        raise UserError(f"MEND training diverged: the gradient norm of the gradient transforms is not finite "
                        f"({exc.__class__.__name__}); lower lr / edit_lr_lr / init_edit_lr in the mend_vl config "
                        f"and resume from the last checkpoint") from None
    lr_grads = [p.grad for p in editor.edit_lrs if p.grad is not None]
    if lr_grads and not bool(torch.isfinite(torch.stack(lr_grads)).all()):
        raise UserError("MEND training diverged: the gradient of the edit learning rates is not finite; lower "
                        "edit_lr_lr / init_edit_lr in the mend_vl config and resume from the last checkpoint")
    return float(norm)
