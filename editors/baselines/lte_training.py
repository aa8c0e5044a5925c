"""LTE-VL training (spec §7): fine-tune the whole LLM to use a prepended edit and ignore it otherwise.

Per record: its edit prefix row ("[Updated Information]prompt target\\n[Query]" with the edit's
image), its request (rel), one item of each generality type (gen) and of each locality type (loc,
text_loc included). Losses (the authors'):
  rel, gen  NLL of the target with the record's prefix before the query
  loc       mean of KL(pre || no prefix) and KL(pre || with the prefix), pre = the ORIGINAL LLM
The LLM changes every step, so `prepare_batch` (prefetch thread) keeps only what does not depend on
it: token ids, spans, labels, image features (the vision encoder and bridge are not trained) and
the locality references, read from the run's stored outputs of the original LLM (`lte_reference.py`,
computed once before the first step; no second LLM copy). `train_step` embeds the text
positions with the current LLM's embeddings (so the embedding matrix trains too). The authors use
batch size 1; larger batches are the same losses averaged over independent rows.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from editors.vllms.batch import with_prefix
from .trained_common import LOC, REL, draw_samples, kl, nll, real_rows


@dataclass
class LTEBatch:
    groups: dict    # (kind, type) -> VLLMBatch, B rows each (text positions re-embedded in the step)
    prefixes: object  # VLLMBatch: the B edits' prefix rows
    pre: dict       # (loc, type) -> [n, V] log-probabilities of the original LLM


def reembed(stack, batch):
    """`batch` with its text positions embedded by `stack` (image positions and padding kept)."""
    ids = batch.token_ids  # [b, l], -1 on image positions and padding
    text = stack.embed_tokens(ids.clamp(min=0)).to(batch.inputs_embeds.dtype)  # [b, l, D]
    return dataclasses.replace(batch, inputs_embeds=torch.where((ids >= 0)[..., None], text, batch.inputs_embeds))


@torch.no_grad()
def prepare_batch(editor, records, rng: np.random.Generator) -> LTEBatch:
    if editor.reference is None:
        raise RuntimeError("LTE training needs prepare_training() first (it computes or reads the locality "
                           "references of the original LLM)")
    vllm = editor.vllm
    samples = draw_samples(records, rng)
    groups, pre = {}, {}
    with vllm.unedited():
        for key, group in samples.items():
            groups[key] = vllm.prepare([s.prompt for s in group], [s.image for s in group], [s.target for s in group])
        edits = samples[(REL, "")]
        prefixes = vllm.prepare([editor.prefix_text(r) for r in edits], [r.image for r in edits], None)
    for key, batch in groups.items():
        if key[0] == LOC:
            pre[key] = editor.reference.log_probs(samples[key], batch.label_mask, vllm.device)  # [n, V]
    return LTEBatch(groups, prefixes, pre)


def train_step(editor, batch: LTEBatch) -> dict[str, float]:
    cfg, vllm = editor.config, editor.vllm
    prefix = reembed(vllm.stack, batch.prefixes)
    prefix_rows = real_rows(prefix.inputs_embeds, prefix.attention_mask)  # B x [p, D]
    terms = {"rel": 0.0, "gen": 0.0, "loc": 0.0}
    for key, group in batch.groups.items():
        plain = reembed(vllm.stack, group)
        prefixed = with_prefix(plain, prefix_rows)
        with_logits = vllm(prefixed)[prefixed.label_mask].float()  # [n, V]
        if key[0] == LOC:
            without = vllm(plain)[plain.label_mask].float()
            pre = batch.pre[key]
            terms["loc"] = terms["loc"] + 0.5 * (kl(pre, without.log_softmax(-1), plain.label_mask)
                                                 + kl(pre, with_logits.log_softmax(-1), prefixed.label_mask))
        else:
            terms[key[0]] = terms[key[0]] + nll(with_logits, prefixed)
    loss = cfg.rel_lambda * terms["rel"] + cfg.gen_lambda * terms["gen"] + cfg.loc_lambda * terms["loc"]
    loss.backward()
    return {"Loss": loss.item(), **{k: float(v.detach()) if torch.is_tensor(v) else float(v)
                                    for k, v in terms.items()}}
