"""SERAC-VL training (spec §7): the counterfactual model's NLL and KL, and the scope losses.

Per step, B records give B edits (their requests) and, per record, its request (rel), one item of
each generality type (gen) and of each locality type (loc, text_loc included: SERAC acts on
text-only rows too). `prepare_batch` (no grad, prefetch thread) builds every group's backbone
inputs and the locality groups' unedited log-probabilities; the backbone is frozen, so nothing
else of it is needed. `train_step`:
  rel, gen  NLL of the target through the counterfactual model given the record's own edit
  loc       KL(post || pre): the counterfactual model given the record's edit must keep the
            unedited prediction on the unrelated query
  scope     cross-entropy over [scores against the B edits | the fixed no-edit logit 10]: rel and
            gen queries pick their own edit (InfoNCE with in-batch negatives), loc queries the
            no-edit column
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .trained_common import (LOC, REL, draw_samples, kl, logits_after_last_layer, nll, real_rows,
                             unedited_logprobs)


@dataclass
class SERACBatch:
    groups: dict      # (kind, type) -> VLLMBatch, B rows each; (rel, "") holds the edits themselves
    pre: dict         # (loc, type) -> [n, V] unedited log-probabilities on the label positions


@torch.no_grad()
def prepare_batch(editor, records, rng: np.random.Generator) -> SERACBatch:
    vllm = editor.vllm
    groups, pre = {}, {}
    with vllm.unedited():
        for key, samples in draw_samples(records, rng).items():
            batch = vllm.prepare([s.prompt for s in samples], [s.image for s in samples],
                                 [s.target for s in samples])
            groups[key] = batch
            if key[0] == LOC:
                pre[key] = unedited_logprobs(vllm, batch)
    return SERACBatch(groups, pre)


def train_step(editor, batch: SERACBatch) -> dict[str, float]:
    cfg, vllm = editor.config, editor.vllm
    edit_batch = batch.groups[(REL, "")]
    edits = real_rows(edit_batch.inputs_embeds, edit_batch.attention_mask)  # B x [n_e, D]
    keys = editor.scope_reps(edits)  # [B, 3w]
    size = len(edits)
    terms = {"rel": 0.0, "gen": 0.0, "loc": 0.0, "scope": 0.0}
    for key, group in batch.groups.items():
        kind = key[0]
        scores = editor.scores(editor.scope_reps(editor.query_rows(group)), keys)  # [B, B]
        no_edit = scores.new_full((size, 1), cfg.no_edit_logit)
        target = torch.full((size,), size, device=scores.device) if kind == LOC else \
            torch.arange(size, device=scores.device)
        terms["scope"] = terms["scope"] + F.cross_entropy(torch.cat([scores, no_edit], 1).float(), target)
        queries = real_rows(group.inputs_embeds, group.attention_mask)
        outs = editor.counterfactual(edits, queries)
        hidden = torch.zeros(group.size, group.length, vllm.hidden_size, dtype=outs[0].dtype,
                             device=outs[0].device)
        hidden = hidden.masked_scatter(group.attention_mask.bool()[..., None], torch.cat(outs))  # [B, l, D]
        logits = logits_after_last_layer(vllm, hidden.to(vllm.dtype), group).float()  # [n, V]
        if kind == LOC:
            terms["loc"] = terms["loc"] + kl(logits.log_softmax(-1), batch.pre[key], group.label_mask)
        else:
            terms[kind] = terms[kind] + nll(logits, group)
    loss = (cfg.rel_lambda * terms["rel"] + cfg.gen_lambda * terms["gen"] + cfg.loc_lambda * terms["loc"]
            + cfg.scope_lambda * terms["scope"])
    loss.backward()
    return {"Loss": loss.item(), **{k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}}
