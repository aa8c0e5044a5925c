"""LiveEdit training (spec §6.7-6.9): batch preparation and the paper's losses.

The backbone is frozen, so everything that depends only on it is computed once per sample per
step, in `prepare_training_batch` (no gradient, may run in the trainer's prefetch thread; all
samples of a step go through the backbone as one batch): the layer-l_e output of each
reliability / generality / locality sample (the reliability forward doubles as the edit signal)
and the locality samples' pre-edit log-probabilities on their label positions. A step then runs
only layers l_e+1..L on h + residual — the correct layer semantics, not the reference code's
double application of layer l_e (spec §6.11). Routing features, soft weights and the residual
come from `features.py`, the functions inference calls too.

Losses (all weights 1 by default):
  rel   mean_i NLL(target_new | h_i + residual(experts chosen by rel_mask_i))
  gen   sum over generality types of the same with gen_mask
  loc   sum over locality types of mean_i KL(post || pre) with loc_mask
  soft  InfoNCE over the batch of query similarities (relative, l_sr2) + absolute term (positive vs
        previous row, l_sr1), each with its own weight; a weight of 0 skips computing that term
  hard  softmax over [edit visual keys | prototype]: neighbours beat the prototype, mismatches lose to it
The config's `expert_mixing` (-SR) and `visual_key` (HR*) reach the step through `features.py`.

Under torchrun (`utils/distributed.py`) every rank draws the random choices of the whole global
batch from the step's rng and computes only its `Shard` of rows; the experts of all C = B edits and
the edit-side routing features (the in-batch negatives) are gathered from the other ranks with
gradients, all in one all_gather (`Shard.gather_rows`), and each mean over the batch becomes this
rank's share of it. In one process the shard is the whole batch and the arithmetic is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.distributed import Shard
from utils.records import EditRecord, Sample
from .features import edit_visual_keys, expert_residual, prototype_similarity, query_weights, visual_features
from .routing import gather_spans, similarity

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
    everything: SampleGroup          # all groups' rows in one batch: rel, gen types, loc types, B rows each
    shard: Shard | None = None       # this process's rows of the global batch (None: all of them)


def make_optimizer(editor):
    cfg = editor.config.train_cfg
    params = [p for m in editor.trainable_modules().values() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    milestones, rate = list(cfg.lr_cut_it), cfg.lr_cut_rate
    # factor = rate ** (number of milestones below the step count): 1 while step <= 10000 (spec §11.10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(rate ** sum(step > m for m in milestones)))
    return optimizer, scheduler


def _groups(editor, samples: dict[tuple[str, str], list[Sample]]):
    """Every sample group of a step through the backbone as ONE batch (one image encoding, one pass to
    l_e), then split back into groups; locality groups also get their pre-edit log-probabilities."""
    vllm, flat = editor.vllm, [s for group in samples.values() for s in group]
    batch = vllm.prepare([s.prompt for s in flat], [s.image for s in flat], [s.target for s in flat])
    hidden = editor.edit_layer_output(batch)  # [N, l, D], N = all samples of the step
    batch = batch.to(hidden.device)  # a backbone over several devices: the step works where layer l_e runs
    groups, start = {}, 0
    for key, group in samples.items():
        sub = batch.rows(start, start + len(group))
        sub_hidden = hidden[start:start + len(group), :sub.length]  # [B, l_group, D]
        start += len(group)
        pre = None
        if key[0] == LOC:
            pre = vllm.logits_from_layer(sub, sub_hidden, editor.config.edit_layer_i,
                                         positions=sub.label_mask).float().to(hidden.device).log_softmax(-1)  # [n, V]
        groups[key] = SampleGroup(sub, sub_hidden, pre)
    return groups, SampleGroup(batch, hidden)


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
    """Features of one batch of records; the random choices come from `rng` only (resumable).

    Sharded (torchrun): the choices are drawn for all records, then only this rank's rows are kept
    (B below is then the shard's width; the masks keep their C = len(records) columns)."""
    shard = Shard.of(len(records))
    gen_types = [t for t, items in records[0].generality.items() if items]
    loc_types = [t for t, items in records[0].locality.items() if items and items[0].image is not None]
    samples = {(REL, ""): [r.requests[int(rng.integers(len(r.requests)))] for r in records]}
    samples.update({(GEN, t): [r.generality[t][int(rng.integers(len(r.generality[t])))] for r in records]
                    for t in gen_types})
    samples.update({(LOC, t): [r.locality[t][int(rng.integers(len(r.locality[t])))] for r in records]
                    for t in loc_types})
    if shard.sharded:
        samples = {key: [group[i] for i in shard.rows()] for key, group in samples.items()}
    groups, everything = _groups(editor, samples)
    rel = groups[(REL, "")]
    gen = {t: groups[(GEN, t)] for t in gen_types}
    loc = {t: groups[(LOC, t)] for t in loc_types}
    rel_mask, gen_mask, loc_mask = _prefix_masks(rng, len(records))
    neighbour, prototype = _pairs(rng, len(records), gen_types, loc_types)
    if shard.sharded:
        rows = shard.rows()
        rel_mask, gen_mask, loc_mask = rel_mask[rows], gen_mask[rows], loc_mask[rows]  # [width, C]
        neighbour, prototype = [neighbour[i] for i in rows], [prototype[i] for i in rows]
    device = editor.vllm.device_of_layer(editor.config.edit_layer_i)  # where the modules and features are
    return LiveEditTrainBatch(rel, gen, loc, rel_mask.to(device), gen_mask.to(device), loc_mask.to(device),
                              neighbour, prototype, everything, shard)


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
    weights = query_weights(editor.inpt_extractor, query, query_mask, query_keys, mask, editor.sim_scale,
                            mixing=editor.config.expert_mixing)  # [B, C]
    dtype = _module_dtype(editor)
    hidden = group.hidden.to(dtype)
    residual = expert_residual(editor.instant_reps_norm, hidden, up, down, weights, dtype)  # [B, l, D]
    edited = (hidden + residual).to(group.hidden.dtype)
    return editor.vllm.logits_from_layer(group.batch, edited, editor.config.edit_layer_i,
                                         positions=group.batch.label_mask).float().to(hidden.device)  # [n, V]


def _per_sample_mean(values: torch.Tensor, label_mask: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Token values [n] (in label_mask order) -> mean over each sample's tokens, then over samples
    (this rank's share of the global batch's mean)."""
    row_of_token = label_mask.nonzero()[:, 0]  # [n]
    sums = torch.zeros(label_mask.shape[0], device=values.device).index_add(0, row_of_token, values)
    return shard.mean(sums / label_mask.sum(1).clamp(min=1))


def _nll(logits, group, shard: Shard) -> torch.Tensor:
    labels = group.batch.labels[group.batch.label_mask]  # [n]
    return _per_sample_mean(F.cross_entropy(logits, labels, reduction="none"), group.batch.label_mask, shard)


def _kl_post_pre(logits, group, shard: Shard) -> torch.Tensor:
    post = logits.log_softmax(-1)  # [n, V]
    kl = (post.exp() * (post - group.pre_logprobs)).sum(-1)  # [n]
    return _per_sample_mean(kl, group.batch.label_mask, shard)


def _group_order(batch: LiveEditTrainBatch) -> list[tuple[str, str]]:
    """The (kind, type) of the groups in the row order of `batch.everything`, B rows each."""
    return [(REL, "")] + [(GEN, t) for t in batch.gen] + [(LOC, t) for t in batch.loc]


def _stack_rows(editor, batch, keys, part):
    """For record j, the `part` ("query" | "vision") reps of the sample named keys[j]: one gather over
    `batch.everything`."""
    order = _group_order(batch)
    rows = torch.tensor([order.index(key) * len(keys) + j for j, key in enumerate(keys)],
                        device=batch.everything.hidden.device)
    return _span_reps(editor, batch.everything, part, rows)  # [B, n, D], [B, n]


def _edit_query(editor, batch, pairs) -> torch.Tensor:
    """Edit-side query features of each record's B item (soft routing) -> [B, e, md]."""
    qb, qb_mask = _stack_rows(editor, batch, [b for _, b in pairs], "query")
    return editor.edit_extractor.extract_query(qb, qb_mask)


def _edit_vision(editor, batch, pairs) -> torch.Tensor:
    """Edit-side visual keys of each record's B item (hard routing; pooled for the HR* row) -> [B, e, md]."""
    qb, qb_mask = _stack_rows(editor, batch, [b for _, b in pairs], "query")
    vb, vb_mask = _stack_rows(editor, batch, [b for _, b in pairs], "vision")
    return edit_visual_keys(editor.edit_extractor, qb, qb_mask, vb, vb_mask, editor.pooled_visual_key)


def _hard_routing_probs(editor, batch, pairs, visual_edit: torch.Tensor) -> torch.Tensor:
    """softmax over [S | prototype] where S[j, k] = sim(input visual of A_j, edit visual key of B_k) -> [B, C+1]
    (rows: this rank's records; columns: every record's B_k, `visual_edit` [C, e, md] gathered from all ranks)."""
    qa, qa_mask = _stack_rows(editor, batch, [a for a, _ in pairs], "query")
    va, va_mask = _stack_rows(editor, batch, [a for a, _ in pairs], "vision")
    pooled = editor.pooled_visual_key
    visual_in, summary = visual_features(editor.inpt_extractor, qa, qa_mask, va, va_mask, pooled)  # [B, e, md] x2
    sim = similarity(visual_in, visual_edit, editor.sim_scale)  # [B, C]
    prototype = prototype_similarity(editor.inpt_extractor, visual_in, qa, qa_mask, summary, editor.sim_scale,
                                     pooled)  # [B]
    return torch.softmax(torch.cat([sim, prototype[:, None]], dim=1), dim=1)  # [B, C+1]


def _soft_routing_used(cfg) -> bool:
    return bool(cfg.soft_routing_rel_lambda or cfg.soft_routing_abs_lambda)


def _soft_routing_terms(editor, batch, shard: Shard, rows, own, edit_query=None) -> dict[str, torch.Tensor]:
    """The soft-routing terms whose weight is not 0 (an ablated term is never computed): input query
    features of A_j against edit query features of B_k (`edit_query` [C, e, md], gathered), S [B, C].
    Keys: "relative" (l_sr2, InfoNCE over the batch), "absolute" (l_sr1) with its logged "positive" /
    "negative" sigmoids."""
    cfg, eps = editor.config.train_cfg, editor.config.train_cfg.eps
    if not _soft_routing_used(cfg):
        return {}
    qa, qa_mask = _stack_rows(editor, batch, [a for a, _ in batch.neighbour_pairs], "query")
    sim = similarity(editor.inpt_extractor.extract_query(qa, qa_mask), edit_query, editor.sim_scale)  # [B, C]
    terms = {}
    if cfg.soft_routing_rel_lambda:
        terms["relative"] = -shard.mean(torch.log(torch.softmax(sim, dim=1)[rows, own] + eps))
    if cfg.soft_routing_abs_lambda:
        positive = torch.sigmoid(sim[rows, own])
        negative = torch.sigmoid(sim.roll(1, dims=1)[rows, own])  # the previous record
        terms["absolute"] = -shard.mean(torch.log(positive + eps) + torch.log(1 - negative + eps))
        terms["positive"], terms["negative"] = positive, negative
    return terms


def _weighted_soft_routing(cfg, terms: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """lambda_rel * relative + lambda_abs * absolute over the computed terms (None: neither). Equal weights
    are applied as lambda * (relative + absolute), the expression (and so the bits) of the single weight."""
    relative, absolute = terms.get("relative"), terms.get("absolute")
    if relative is not None and absolute is not None:
        if cfg.soft_routing_rel_lambda == cfg.soft_routing_abs_lambda:
            return cfg.soft_routing_rel_lambda * (relative + absolute)
        return cfg.soft_routing_rel_lambda * relative + cfg.soft_routing_abs_lambda * absolute
    if relative is not None:
        return cfg.soft_routing_rel_lambda * relative
    if absolute is not None:
        return cfg.soft_routing_abs_lambda * absolute
    return None


def _soft_routing_logs(terms: dict[str, torch.Tensor], shard: Shard) -> dict[str, torch.Tensor]:
    """TensorBoard scalars of the computed soft-routing terms (an ablated term has none)."""
    logs = {}
    if "relative" in terms:
        logs["MoE soft routing relative loss"] = terms["relative"]
    if "absolute" in terms:
        logs.update({"MoE soft routing abstract loss": terms["absolute"],
                     "MoE soft routing mean abstract positive similarity": shard.mean(terms["positive"]),
                     "MoE soft routing mean abstract negative similarity": shard.mean(terms["negative"])})
    if "relative" in terms and "absolute" in terms:
        logs["MoE soft routing loss"] = terms["relative"] + terms["absolute"]
    elif terms:
        logs["MoE soft routing loss"] = terms.get("relative", terms.get("absolute"))
    return logs


def training_step(editor, batch: LiveEditTrainBatch) -> dict[str, float]:
    """All losses of one batch, backward on the weighted total; returns the logged scalars.

    Sharded: B is this rank's rows, C the global batch; the losses and the backward are this rank's
    share, the logged scalars the global values."""
    cfg, eps = editor.config.train_cfg, editor.config.train_cfg.eps
    shard = batch.shard or Shard(batch.rel_mask.shape[0])
    logs: dict[str, torch.Tensor] = {}
    # experts of the batch's edits (the reliability samples are the edit requests) and the edit-side
    # routing features (the in-batch negatives), of every rank: one all_gather for all of them
    keys = editor.make_edit_keys(batch.rel.hidden, batch.rel.batch)
    edit_neighbour = _edit_vision(editor, batch, batch.neighbour_pairs)  # [B, e, md]
    edit_prototype = _edit_vision(editor, batch, batch.prototype_pairs)  # [B, e, md]
    # the edit query features only when a soft-routing term is computed (an ablated pair is not)
    edit_query = [_edit_query(editor, batch, batch.neighbour_pairs)] if _soft_routing_used(cfg) else []  # [B, e, md]
    query_keys, up, down, edit_neighbour, edit_prototype, *edit_query = shard.gather_rows(
        keys["query_keys"], keys["up"], keys["down"], edit_neighbour, edit_prototype, *edit_query)  # [C, ...] each

    # one pass of layers l_e+1..L over every sample of the step, each row with its own expert mask
    mask_of = {REL: batch.rel_mask, GEN: batch.gen_mask, LOC: batch.loc_mask}
    masks = torch.cat([mask_of[kind] for kind, _ in _group_order(batch)])  # [N, C]
    logits = _edited_logits(editor, batch.everything, query_keys, up, down, masks)  # [n_all, V]
    label_mask = batch.everything.batch.label_mask  # [N, l], N = groups x B rows
    tokens_per_group = label_mask.sum(1).view(-1, batch.rel_mask.shape[0]).sum(1).tolist()
    logits_rel, *logits_rest = logits.split(tokens_per_group)
    logits_gen, logits_loc = logits_rest[:len(batch.gen)], logits_rest[len(batch.gen):]

    rel_loss = _nll(logits_rel, batch.rel, shard)
    gen_loss = rel_loss.new_zeros(())
    for (name, group), group_logits in zip(batch.gen.items(), logits_gen):
        term = _nll(group_logits, group, shard)
        logs[f"Generality loss {name}"] = term
        gen_loss = gen_loss + term
    loc_loss = rel_loss.new_zeros(())
    for (name, group), group_logits in zip(batch.loc.items(), logits_loc):
        term = _kl_post_pre(group_logits, group, shard)
        logs[f"Locality loss {name}"] = term
        loc_loss = loc_loss + term

    # soft routing: input query features of A_j against edit query features of B_k
    rows, own = shard.diagonal(editor.instant_reps_norm.weight.device)  # [B] x2: row j and its own record's column
    soft_terms = _soft_routing_terms(editor, batch, shard, rows, own, *edit_query)

    # hard routing: neighbours must beat the prototype, mismatched pairs must lose to it
    neighbour = -shard.mean(torch.log(_hard_routing_probs(editor, batch, batch.neighbour_pairs, edit_neighbour)[rows, own]
                                      + eps))
    prototype = -shard.mean(torch.log(_hard_routing_probs(editor, batch, batch.prototype_pairs, edit_prototype)[:, -1]
                                      + eps))
    hard_loss = neighbour + prototype

    total = cfg.rel_lambda * rel_loss + cfg.gen_lambda * gen_loss + cfg.loc_lambda * loc_loss
    soft_loss = _weighted_soft_routing(cfg, soft_terms)
    if soft_loss is not None:
        total = total + soft_loss
    total = total + cfg.hard_routing_lambda * hard_loss
    total.backward()
    logs.update({
        "Loss": total, "Reliability loss": rel_loss, "Generality loss": gen_loss,
        "Locality loss": loc_loss, **_soft_routing_logs(soft_terms, shard),
        "MoE hard routing neighbor loss": neighbour, "MoE hard routing prototype loss": prototype,
        "MoE hard routing loss": hard_loss,
    })
    return shard.totals(logs)
