"""RECIPE-VL training (spec §7): three contrastive losses and the prompts' rel / gen / loc losses.

Per record: the edit ("prompt target" -> knowledge k_i), its request (rel), one item of each
generality type (gen) and of each locality type (loc, text_loc included). Two of the record's
related queries (rel or gen, picked with the step's rng) are q1 and q2. With sim = dot / sqrt(C)
and the prototype p:
  q2k       softmax_t(sim(q1_i, [k_1..k_B, p])) must pick k_i (InfoNCE, in-batch negatives)
  q2prot-rg softmax_t(sim(q2_i, [k_j (j != i)] with p in slot i)) must pick p: the prototype beats
            every unrelated edit for a related query
  q2prot-loc softmax_t(sim(loc_i, [k_1..k_B, p])) must pick p: unrelated queries retrieve nothing
The two prototype terms are hinged (the authors' `constra_hinge_scale` 1.2): a row counts only
while its probability is below 1.2 x the runner-up's. Then each record's prompt tokens
P(k_i) go before its rel, gen and loc samples (`with_prefix`, image kept):
  rel, gen  NLL of the target;  loc  KL(post || pre) against the unedited backbone.
The backbone inputs and the loc references are built once per sample in `prepare_batch` (no grad).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from editors.vllms.batch import with_prefix
from .recipe import knowledge_text
from .trained_common import LOC, REL, draw_samples, kl, nll, unedited_logprobs


@dataclass
class RECIPEBatch:
    groups: dict            # (kind, type) -> VLLMBatch, B rows each
    texts: dict             # (kind, type) -> B prompts (the queries' text)
    knowledge: list         # B "prompt target" texts of the edits
    q1: list                # B (kind, type) keys: each record's first related query
    q2: list                # B (kind, type) keys: its second one (another related sample)
    pre: dict               # (loc, type) -> [n, V] unedited log-probabilities


@torch.no_grad()
def prepare_batch(editor, records, rng: np.random.Generator) -> RECIPEBatch:
    vllm = editor.vllm
    samples = draw_samples(records, rng)
    related = [k for k in samples if k[0] != LOC]
    q1, q2 = [], []
    for _ in records:
        a, b = rng.choice(len(related), size=2, replace=len(related) < 2)
        q1.append(related[int(a)])
        q2.append(related[int(b)])
    groups, texts, pre = {}, {}, {}
    with vllm.unedited():
        for key, group in samples.items():
            batch = vllm.prepare([s.prompt for s in group], [s.image for s in group], [s.target for s in group])
            groups[key], texts[key] = batch, [s.prompt for s in group]
            if key[0] == LOC:
                pre[key] = unedited_logprobs(vllm, batch)
    knowledge = [knowledge_text(s.prompt, s.target) for s in samples[(REL, "")]]
    return RECIPEBatch(groups, texts, knowledge, q1, q2, pre)


def _hinged_nll(probs: torch.Tensor, target: torch.Tensor, hinge: float) -> torch.Tensor:
    """-log p[target] over rows where p[target] < hinge x the runner-up (the row's second largest)."""
    picked = probs.gather(1, target[:, None])[:, 0]  # [B]
    second = probs.topk(2, dim=1).values[:, 1]  # [B]
    keep = picked < second * hinge
    if not bool(keep.any()):
        return probs.new_zeros(())
    return -torch.log(picked[keep] + 1e-8).mean()


def _queries(editor, batch: RECIPEBatch, keys: list) -> torch.Tensor:
    """Per record i the query text of group keys[i] -> query representations [B, C]."""
    return editor.krm([batch.texts[k][i] for i, k in enumerate(keys)], "q")


def train_step(editor, batch: RECIPEBatch) -> dict[str, float]:
    cfg, vllm = editor.config, editor.vllm
    knowledge = editor.krm(batch.knowledge, "k")  # [B, C]
    prototype = editor.krm.prototype_rep()  # [1, C]
    with_proto = torch.cat([knowledge, prototype])  # [B+1, C]
    size = len(knowledge)
    own = torch.arange(size, device=knowledge.device)
    logs = {}
    sim1 = editor.similarity(_queries(editor, batch, batch.q1), with_proto)  # [B, B+1]
    logs["q2k"] = F.cross_entropy(sim1 * cfg.query_knowledge_t, own)
    q2 = _queries(editor, batch, batch.q2)
    sim2 = editor.similarity(q2, knowledge)  # [B, B]
    sim2 = torch.where(torch.eye(size, dtype=torch.bool, device=sim2.device),
                       editor.similarity(q2, prototype).expand(-1, size), sim2)
    logs["q2prot_rg"] = _hinged_nll(torch.softmax(sim2 * cfg.query_prototype_t, 1), own, cfg.hinge_scale)
    logs["q2prot_loc"] = knowledge.new_zeros(())
    for key in (k for k in batch.groups if k[0] == LOC):
        sim3 = editor.similarity(editor.krm(batch.texts[key], "q"), with_proto)  # [B, B+1]
        logs["q2prot_loc"] = logs["q2prot_loc"] + _hinged_nll(
            torch.softmax(sim3 * cfg.query_prototype_t, 1), torch.full_like(own, size), cfg.hinge_scale)
    contrastive = logs["q2k"] + logs["q2prot_rg"] + logs["q2prot_loc"]
    prompts = editor.prompt_transformer(knowledge)  # [B, T, D]
    terms = {"rel": 0.0, "gen": 0.0, "loc": 0.0}
    for key, group in batch.groups.items():
        prefixed = with_prefix(group, list(prompts))
        logits = vllm(prefixed)[prefixed.label_mask].float()  # [n, V]
        if key[0] == LOC:
            terms["loc"] = terms["loc"] + kl(logits.log_softmax(-1), batch.pre[key], prefixed.label_mask)
        else:
            terms[key[0]] = terms[key[0]] + nll(logits, prefixed)
    loss = (cfg.contrastive_lambda * contrastive + cfg.rel_lambda * terms["rel"] + cfg.gen_lambda * terms["gen"]
            + cfg.loc_lambda * terms["loc"])
    loss.backward()
    logs.update(terms)
    return {"Loss": loss.item(), **{k: float(v.detach()) if torch.is_tensor(v) else float(v)
                                    for k, v in logs.items()}}
