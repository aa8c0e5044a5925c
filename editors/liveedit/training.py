"""LiveEdit training (spec §6.7-6.9): batch preparation and the paper's losses.

The backbone is frozen, so everything that depends only on it is computed once per sample per
step, in `prepare_training_batch` (no gradient, may run in the trainer's prefetch thread):
the layer-l_e output of each reliability / generality / locality sample (the reliability forward
doubles as the edit signal) and the locality samples' pre-edit log-probabilities on their label
positions. A step then runs only layers l_e+1..L on h + residual — the correct layer semantics,
not the reference code's double application of layer l_e (spec §6.11).

Losses (all weights 1 by default):
  rel   mean_i NLL(target_new | h_i + residual(experts chosen by rel_mask_i))
  gen   sum over generality types of the same with gen_mask
  loc   sum over locality types of mean_i KL(post || pre) with loc_mask
  soft  InfoNCE over the batch of query similarities + absolute term (positive vs previous row)
  hard  softmax over [edit visual keys | prototype]: neighbours beat the prototype, mismatches lose to it
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.records import EditRecord, Sample
from .routing import gather_spans, mixture_residual, paired_similarity, similarity, soft_weights

REL, GEN, LOC = "rel", "gen", "loc"


@dataclass
class SampleGroup:
    """One kind of sample for the whole batch (e.g. all records' text_rephrase items)."""

    batch: object                    # VLLMBatch
    hidden: torch.Tensor             # [B, l, D] layer-l_e output, unedited
    pre_logprobs: torch.Tensor | None = None  # [n_label_positions, V] locality only


@dataclass
class LiveEditTrainBatch:
    rel: SampleGroup
    gen: dict[str, SampleGroup]
    loc: dict[str, SampleGroup]
    rel_mask: torch.Tensor           # [B, C] bool, experts used for each reliability sample
    gen_mask: torch.Tensor           # [B, C]
    loc_mask: torch.Tensor           # [B, C]
    # per record j, the (kind, type) of items A_j and B_j: kind in rel | gen | loc
    neighbour_pairs: list[tuple[tuple[str, str], tuple[str, str]]]  # soft routing and L_neib
    prototype_pairs: list[tuple[tuple[str, str], tuple[str, str]]]


def make_optimizer(editor):
    cfg = editor.config.train_cfg
    params = [p for m in editor.trainable_modules().values() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    milestones, rate = list(cfg.lr_cut_it), cfg.lr_cut_rate
    # factor = rate ** (number of milestones below the step count): 1 while step <= 10000 (spec §11.10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(rate ** sum(step > m for m in milestones)))
    return optimizer, scheduler


def _group(editor, samples: list[Sample], with_pre_logprobs: bool = False) -> SampleGroup:
    vllm = editor.vllm
    batch = vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])
    hidden = editor.edit_layer_output(batch)  # [B, l, D]
    pre = None
    if with_pre_logprobs:
        pre = vllm.logits_from_layer(batch, hidden, editor.config.edit_layer_i,
                                     positions=batch.label_mask).float().log_softmax(-1)  # [n, V]
    return SampleGroup(batch, hidden, pre)


def _prefix_masks(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's expert masks over the C = B batch edits: own expert + a random prefix of the batch."""
    rel, gen, loc = (torch.zeros(size, size, dtype=torch.bool) for _ in range(3))
    for i in range(size):
        rel[i, i] = gen[i, i] = True
        n_rel, n_gen, n_loc = rng.integers(0, size + 1, size=3)
        rel[i, :n_rel] = True
        gen[i, :n_gen] = True
        loc[i, :n_loc] = True
    return rel, gen, loc


def _pairs(rng, size, gen_types, loc_types):
    """Per record: neighbour pairs (same record: rel/gen with rel/gen, or loc with loc) and prototype
    pairs (rel/gen against loc, in either order), spec §6.7 items 7-8."""
    def pick(kind):
        if kind == GEN:
            return (GEN, gen_types[rng.integers(len(gen_types))])
        if kind == LOC:
            return (LOC, loc_types[rng.integers(len(loc_types))])
        return (REL, "")

    def rel_or_gen():
        return pick((REL, GEN)[rng.integers(2)])

    neighbour, prototype = [], []
    for _ in range(size):
        kind = (REL, GEN, LOC)[rng.integers(3)]
        neighbour.append((pick(kind), pick(LOC) if kind == LOC else rel_or_gen()))
        if rng.integers(2) == 0:
            prototype.append((rel_or_gen(), pick(LOC)))
        else:
            prototype.append((pick(LOC), rel_or_gen()))
    return neighbour, prototype


@torch.no_grad()
def prepare_training_batch(editor, records: list[EditRecord], rng: np.random.Generator) -> LiveEditTrainBatch:
    """Features of one batch of records; the random choices come from `rng` only (resumable)."""
    rel = _group(editor, [r.requests[int(rng.integers(len(r.requests)))] for r in records])
    gen_types = [t for t, items in records[0].generality.items() if items]
    loc_types = [t for t, items in records[0].locality.items() if items and items[0].image is not None]
    gen = {t: _group(editor, [r.generality[t][int(rng.integers(len(r.generality[t])))] for r in records])
           for t in gen_types}
    loc = {t: _group(editor, [r.locality[t][int(rng.integers(len(r.locality[t])))] for r in records],
                     with_pre_logprobs=True) for t in loc_types}
    rel_mask, gen_mask, loc_mask = _prefix_masks(rng, len(records))
    neighbour, prototype = _pairs(rng, len(records), gen_types, loc_types)
    device = editor.vllm.device
    return LiveEditTrainBatch(rel, gen, loc, rel_mask.to(device), gen_mask.to(device), loc_mask.to(device),
                              neighbour, prototype)


# ---- the step -------------------------------------------------------------------------------------------

def _module_dtype(editor):
    return editor.instant_reps_norm.weight.dtype


def _span_reps(editor, group: SampleGroup, part: str, rows=None):
    """The `part` ("query" | "vision") representations of a group's samples (optionally some rows)."""
    hidden, spans = group.hidden, getattr(group.batch, f"{part}_spans")
    if rows is not None:
        hidden, spans = hidden[rows], spans[rows]
    return gather_spans(hidden.to(_module_dtype(editor)), spans)


def _edited_logits(editor, group: SampleGroup, query_keys, up, down, mask) -> torch.Tensor:
    """Logits on the label positions after adding the soft-weighted residual of the masked experts."""
    query, query_mask = _span_reps(editor, group, "query")
    sim = similarity(editor.inpt_extractor.extract_query(query, query_mask), query_keys, editor.sim_scale)  # [B, C]
    weights = soft_weights(sim, mask)  # [B, C]
    hidden = group.hidden.to(_module_dtype(editor))
    residual = mixture_residual(editor.instant_reps_norm(hidden), up, down, weights)  # [B, l, D]
    edited = (hidden + residual).to(group.hidden.dtype)
    return editor.vllm.logits_from_layer(group.batch, edited, editor.config.edit_layer_i,
                                         positions=group.batch.label_mask).float()  # [n, V]


def _per_sample_mean(values: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Token values [n] (in label_mask order) -> mean over each sample's tokens, then over samples."""
    row_of_token = label_mask.nonzero()[:, 0]  # [n]
    sums = torch.zeros(label_mask.shape[0], device=values.device).index_add(0, row_of_token, values)
    return (sums / label_mask.sum(1).clamp(min=1)).mean()


def _nll(logits, group) -> torch.Tensor:
    labels = group.batch.labels[group.batch.label_mask]  # [n]
    return _per_sample_mean(F.cross_entropy(logits, labels, reduction="none"), group.batch.label_mask)


def _kl_post_pre(logits, group) -> torch.Tensor:
    post = logits.log_softmax(-1)  # [n, V]
    kl = (post.exp() * (post - group.pre_logprobs)).sum(-1)  # [n]
    return _per_sample_mean(kl, group.batch.label_mask)


def _group_of(batch: LiveEditTrainBatch, key: tuple[str, str]) -> SampleGroup:
    kind, name = key
    return batch.rel if kind == REL else (batch.gen if kind == GEN else batch.loc)[name]


def _stack_rows(editor, batch, keys, part):
    """Gather, for record j, the `part` ("query" | "vision") reps of the sample named keys[j]."""
    pieces = [_span_reps(editor, _group_of(batch, key), part, [j]) for j, key in enumerate(keys)]
    width = max(p[0].shape[1] for p in pieces)
    reps = torch.cat([F.pad(p[0], (0, 0, 0, width - p[0].shape[1])) for p in pieces])  # [B, n, D]
    mask = torch.cat([F.pad(p[1], (0, width - p[1].shape[1])) for p in pieces])  # [B, n]
    return reps, mask


def _hard_routing_probs(editor, batch, pairs) -> torch.Tensor:
    """softmax over [S | prototype] where S[j, k] = sim(input visual of A_j, edit visual key of B_k) -> [B, B+1]."""
    qa, qa_mask = _stack_rows(editor, batch, [a for a, _ in pairs], "query")
    va, va_mask = _stack_rows(editor, batch, [a for a, _ in pairs], "vision")
    qb, qb_mask = _stack_rows(editor, batch, [b for _, b in pairs], "query")
    vb, vb_mask = _stack_rows(editor, batch, [b for _, b in pairs], "vision")
    summary = editor.inpt_extractor.query_summary(qa, qa_mask)  # [B, e, md]
    visual_in = editor.inpt_extractor.read_vision(summary, va, va_mask)  # [B, e, md]
    visual_edit = editor.edit_extractor.extract_vision(qb, qb_mask, vb, vb_mask)  # [B, e, md]
    sim = similarity(visual_in, visual_edit, editor.sim_scale)  # [B, B]
    prototype = paired_similarity(visual_in, editor.inpt_extractor.extract_from_prototype(qa, qa_mask, summary),
                                  editor.sim_scale)  # [B]
    return torch.softmax(torch.cat([sim, prototype[:, None]], dim=1), dim=1)  # [B, B+1]


def training_step(editor, batch: LiveEditTrainBatch) -> dict[str, float]:
    """All losses of one batch, backward on the weighted total; returns the logged scalars."""
    cfg, eps = editor.config.train_cfg, editor.config.train_cfg.eps
    logs: dict[str, float] = {}
    # experts of the batch's edits (the reliability samples are the edit requests)
    keys = editor.make_edit_keys(batch.rel.hidden, batch.rel.batch)
    query_keys, up, down = keys["query_keys"], keys["up"], keys["down"]  # [C, e, md], [C, r, D] x2

    rel_loss = _nll(_edited_logits(editor, batch.rel, query_keys, up, down, batch.rel_mask), batch.rel)
    gen_loss = rel_loss.new_zeros(())
    for name, group in batch.gen.items():
        term = _nll(_edited_logits(editor, group, query_keys, up, down, batch.gen_mask), group)
        logs[f"Generality loss {name}"] = term.item()
        gen_loss = gen_loss + term
    loc_loss = rel_loss.new_zeros(())
    for name, group in batch.loc.items():
        term = _kl_post_pre(_edited_logits(editor, group, query_keys, up, down, batch.loc_mask), group)
        logs[f"Locality loss {name}"] = term.item()
        loc_loss = loc_loss + term

    # soft routing: input query features of A_j against edit query features of B_k
    qa, qa_mask = _stack_rows(editor, batch, [a for a, _ in batch.neighbour_pairs], "query")
    qb, qb_mask = _stack_rows(editor, batch, [b for _, b in batch.neighbour_pairs], "query")
    sim = similarity(editor.inpt_extractor.extract_query(qa, qa_mask),
                     editor.edit_extractor.extract_query(qb, qb_mask), editor.sim_scale)  # [B, B]
    diag = torch.arange(sim.shape[0], device=sim.device)
    relative = -torch.log(torch.softmax(sim, dim=1)[diag, diag] + eps).mean()
    positive = torch.sigmoid(sim[diag, diag])
    negative = torch.sigmoid(sim.roll(1, dims=1)[diag, diag])  # the previous record
    absolute = -(torch.log(positive + eps) + torch.log(1 - negative + eps)).mean()
    soft_loss = relative + absolute

    # hard routing: neighbours must beat the prototype, mismatched pairs must lose to it
    neighbour = -torch.log(_hard_routing_probs(editor, batch, batch.neighbour_pairs)[diag, diag] + eps).mean()
    prototype = -torch.log(_hard_routing_probs(editor, batch, batch.prototype_pairs)[:, -1] + eps).mean()
    hard_loss = neighbour + prototype

    total = (cfg.rel_lambda * rel_loss + cfg.gen_lambda * gen_loss + cfg.loc_lambda * loc_loss
             + cfg.soft_routing_lambda * soft_loss + cfg.hard_routing_lambda * hard_loss)
    total.backward()
    logs.update({
        "Loss": total.item(), "Reliability loss": rel_loss.item(), "Generality loss": gen_loss.item(),
        "Locality loss": loc_loss.item(),
        "MoE soft routing relative loss": relative.item(), "MoE soft routing abstract loss": absolute.item(),
        "MoE soft routing mean abstract positive similarity": positive.mean().item(),
        "MoE soft routing mean abstract negative similarity": negative.mean().item(),
        "MoE soft routing loss": soft_loss.item(),
        "MoE hard routing neighbor loss": neighbour.item(), "MoE hard routing prototype loss": prototype.item(),
        "MoE hard routing loss": hard_loss.item(),
    })
    return logs
