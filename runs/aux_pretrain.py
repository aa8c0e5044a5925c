"""Teach the tiny LTE retriever stand-in (`tiny-mpnet`) to match questions to their edit, on the toy world.

The real LTE retriever, multi-qa-mpnet-base-dot-v1, is a sentence encoder trained for question ->
passage matching. The random `tiny-mpnet` is not: its mean-pooled encodings of any two short
sentences have a cosine above LTE's 0.3 threshold, so every query retrieves an edit. This module
trains the stand-in briefly, from its seeded random init and with its own tokenizer, with LTE's
exact encoding (the config's pooling of the last hidden states, L2-normalised), on the TRAIN split
of the toy world only (never the eval split):

- pairs (query -> key), the key as LTE writes it, `prompt + ' ' + target`:
  each edit's request prompt -> its key, its text rephrase -> the same key, and (`text_facts`)
  each text-locality question -> its own `prompt + ' ' + answer` passage (the world's text facts,
  so a factual question has passages of its own and is not drawn towards the edits' keys);
- loss: InfoNCE over the batch's distinct keys (in-batch negatives), cosine / `temperature`;
- hard negatives (`hard_negatives`): per pair one key of another train edit with the same question
  and another answer. Note: the query is the prompt alone, so such a key is as relevant to it as its
  own (the text cannot tell them apart); it teaches the encoder to weigh the question above the
  answer, and leaves a loss floor.

The result is cached under `records/pretrained/tiny-mpnet-<key>/` (`save_pretrained` of the model and
its tokenizer, plus `retriever_report.json` with the time, the config and the eval-split retrieval
numbers of the trained and of the random stand-in); LTE uses it with
`--aux_model_path tiny-mpnet=<folder>`. `python -m runs.aux_pretrain --data_dir data` trains it (or
finds it cached) and prints the folder and the numbers. Same seed and world, same weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from editors.auxiliary import AuxModel, build_tiny_aux, encode_texts, masked_pool, save_aux
from runs.data import load_split
from toyworld.world import QUESTIONS, read_manifest, vqa_prompt
from utils.errors import UserError
from utils.io import folder_atomic, write_json_atomic
from utils.records import EditRecord

RETRIEVER = "tiny-mpnet"
REPORT_FILE = "retriever_report.json"


@dataclass
class RetrieverPretrainConfig:
    """How the tiny retriever learns: AdamW, linear warm-up then cosine decay, one CPU thread."""

    steps: int = 300
    batch: int = 32             # (query, key) pairs per step
    lr: float = 1e-3
    warmup: int = 30
    weight_decay: float = 0.01
    temperature: float = 0.2    # cosine / temperature are the InfoNCE logits (0.05 left cross-type cosines ~0.5)
    hard_negatives: bool = True  # + per pair a key of another edit with the same question, another answer
    text_facts: bool = True     # + text-locality questions -> their own passages
    pooling: str = "mean"       # as configs/lte_vl/tiny-*.yaml (LTE's `pooling`)
    seed: int = 0               # the stand-in's init (as LTE's `seed`) and the data order


@dataclass(frozen=True)
class Pair:
    """A query text, the key text it should retrieve, and the edit question it belongs to (or None)."""

    query: str
    key: str
    question: str | None


def lte_key(prompt: str, target: str) -> str:
    """The key text LTE stores for an edit (editors/baselines/lte.py: `LTE.edit`)."""
    return f"{prompt} {target}"


def training_pairs(records: Sequence[EditRecord], text_facts: bool = True) -> list[Pair]:
    """The distinct (query, key) pairs of `records`, in first-seen order."""
    pairs: dict[Pair, None] = {}
    for record in records:
        for request in record.requests:
            key = lte_key(request.prompt, request.target)
            pairs[Pair(request.prompt, key, request.prompt)] = None
            for rephrase in record.generality.get("text_rephrase", []):
                pairs[Pair(rephrase.prompt, key, request.prompt)] = None
        if text_facts:
            for fact in record.locality.get("text_loc", []):
                pairs[Pair(fact.prompt, lte_key(fact.prompt, fact.target), None)] = None
    return list(pairs)


def keys_by_question(pairs: Sequence[Pair]) -> dict[str, list[str]]:
    """Edit question -> the distinct keys of the edits asking it (the hard-negative pool)."""
    table: dict[str, dict[str, None]] = {}
    for pair in pairs:
        if pair.question is not None:
            table.setdefault(pair.question, {})[pair.key] = None
    return {q: list(keys) for q, keys in table.items()}


def embed(aux: AuxModel, texts: list[str], pooling: str) -> torch.Tensor:
    """Texts -> unit sentence embeddings [n, w], as LTE's `encode` computes them (with gradients)."""
    hidden, mask, _ = encode_texts(aux, texts)  # [n, l, w], [n, l]
    return F.normalize(masked_pool(hidden, mask, (pooling,)).float(), dim=-1)


def _lr_factor(step: int, cfg: RetrieverPretrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + np.cos(np.pi * progress))


def train_retriever(records: Sequence[EditRecord], cfg: RetrieverPretrainConfig,
                    log_every: int = 0) -> tuple[AuxModel, list[float]]:
    """The seeded random stand-in trained on `records` (train split): (model in eval mode, losses)."""
    aux = build_tiny_aux(RETRIEVER, seed=cfg.seed)
    pairs = training_pairs(records, cfg.text_facts)
    if not pairs:
        raise UserError("the train split has no edit requests to train the retriever on")
    pool = keys_by_question(pairs)
    rng = np.random.default_rng(cfg.seed)
    model = aux.model
    model.eval()  # no dropout; gradients stay on
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for step in range(cfg.steps):
            chosen = [pairs[i] for i in rng.choice(len(pairs), size=min(cfg.batch, len(pairs)), replace=False)]
            keys: dict[str, int] = {}
            for pair in chosen:
                keys.setdefault(pair.key, len(keys))
            if cfg.hard_negatives:
                for pair in chosen:
                    others = [k for k in pool.get(pair.question, []) if k != pair.key] if pair.question else []
                    if others:
                        keys.setdefault(others[int(rng.integers(len(others)))], len(keys))
            q = embed(aux, [p.query for p in chosen], cfg.pooling)  # [b, w]
            k = embed(aux, list(keys), cfg.pooling)                 # [n_keys, w]
            labels = torch.tensor([keys[p.key] for p in chosen])    # [b]
            loss = F.cross_entropy(q @ k.T / cfg.temperature, labels)  # logits [b, n_keys]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log_every and (step % log_every == 0 or step == cfg.steps - 1):
                print(f"step {step}: loss {losses[-1]:.3f}", flush=True)
    model.requires_grad_(False)
    return aux, losses


@torch.no_grad()
def _embed_all(aux: AuxModel, texts: list[str], pooling: str, batch: int = 256) -> torch.Tensor:
    return torch.cat([embed(aux, texts[i:i + batch], pooling) for i in range(0, len(texts), batch)])


def consecutive_chunks(records: Sequence[EditRecord], size: int) -> list[list[EditRecord]]:
    """The records edited `size` at a time, in order (the evaluator's `-sen size`)."""
    return [list(records[i:i + size]) for i in range(0, len(records), size)]


def mixed_question_chunks(records: Sequence[EditRecord]) -> list[list[EditRecord]]:
    """Chunks of one edit per toy-world question type (shape, colour, count), taken in order; records
    left over once a type runs out are dropped. Within such a chunk the query TEXT can tell the edits
    apart, so "its own key ranks first" is a fair test of a text retriever (in consecutive chunks an
    edit usually shares its question with others, told apart only by the picture and the answer)."""
    type_of = {vqa_prompt(q): t for t, qs in QUESTIONS.items() for q in qs}
    queues: dict[str, list[EditRecord]] = {t: [] for t in QUESTIONS}
    for record in records:
        kind = type_of.get(record.requests[0].prompt)
        if kind is not None:
            queues[kind].append(record)
    return [list(group) for group in zip(*queues.values())]


@torch.no_grad()
def retrieval_report(aux: AuxModel, chunks: Sequence[Sequence[EditRecord]], threshold: float = 0.3,
                     pooling: str = "mean") -> dict[str, float]:
    """LTE's retrieval when each chunk of records is edited at once (then restored):

    `rel` / `text_rephrase`: share of request prompts / text rephrases whose own key has the best
    cosine among the chunk's keys (strictly: its own index) and a cosine > `threshold`;
    `text_loc` / `image_loc`: share of locality prompts whose best cosine to the chunk's keys is
    > `threshold` (they would get an edit prefix; lower is better)."""
    hits: dict[str, list[bool]] = {"rel": [], "text_rephrase": [], "text_loc": [], "image_loc": []}
    for chunk in chunks:
        keys = _embed_all(aux, [lte_key(r.requests[0].prompt, r.requests[0].target) for r in chunk], pooling)
        for kind in hits:
            owners, prompts = [], []
            for j, r in enumerate(chunk):
                samples = r.requests[:1] if kind == "rel" else (r.generality if kind == "text_rephrase"
                                                                  else r.locality).get(kind, [])
                owners += [j] * len(samples)
                prompts += [s.prompt for s in samples]
            if not prompts:
                continue
            best, which = (_embed_all(aux, prompts, pooling) @ keys.T).max(dim=1)  # [n]
            above = best > threshold
            if kind in ("rel", "text_rephrase"):
                above &= which == torch.tensor(owners)
            hits[kind].extend(above.tolist())
    return {kind: round(sum(v) / len(v), 4) for kind, v in hits.items() if v}


def eval_settings(records: Sequence[EditRecord]) -> dict[str, list[list[EditRecord]]]:
    """The chunkings the report measures: single edits (the documented LTE evaluation), 50 consecutive
    edits at once, and chunks of three edits of different question types."""
    return {"1 edit": consecutive_chunks(records, 1), "50 edits": consecutive_chunks(records, 50),
            "3 edits, one per question type": mixed_question_chunks(records)}


def cache_key(world_manifest: dict, cfg: RetrieverPretrainConfig) -> str:
    blob = json.dumps({"name": RETRIEVER, "world": world_manifest.get("args"),
                       "world_version": world_manifest.get("version"), "cfg": dataclasses.asdict(cfg)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def ensure_retriever(data_dir: str, records_dir: str = "records", cfg: RetrieverPretrainConfig | None = None,
                     force: bool = False, log_every: int = 0) -> str:
    """Folder of the trained `tiny-mpnet` for the toy world under `data_dir` (trains it on first use,
    or always with `force`): the model and tokenizer, and `retriever_report.json`."""
    cfg = cfg or RetrieverPretrainConfig()
    _, train = load_split("TOY", "train", data_dir)
    world = read_manifest(os.path.join(data_dir, "toyworld")) or {}
    out = os.path.join(records_dir, "pretrained", f"{RETRIEVER}-{cache_key(world, cfg)}")
    if not force and os.path.isfile(os.path.join(out, REPORT_FILE)):
        return out
    torch.set_num_threads(1)
    start = time.time()
    aux, losses = train_retriever(train, cfg, log_every)
    seconds = time.time() - start
    _, eval_records = load_split("TOY", "eval", data_dir)
    random_aux = build_tiny_aux(RETRIEVER, seed=cfg.seed)
    report = {"name": RETRIEVER, "seconds": round(seconds, 1), "config": dataclasses.asdict(cfg),
              "train_pairs": len(training_pairs(train, cfg.text_facts)),
              "loss_first_last": [round(losses[0], 4), round(float(np.mean(losses[-20:])), 4)],
              "eval_records": len(eval_records), "threshold": 0.3, "eval_retrieval": {}}
    for setting, chunks in eval_settings(eval_records).items():
        report["eval_retrieval"][setting] = {
            which: retrieval_report(model, chunks, pooling=cfg.pooling)
            for which, model in (("trained", aux), ("random", random_aux))}
    with folder_atomic(out) as tmp:
        save_aux(aux, tmp)
        write_json_atomic(os.path.join(tmp, REPORT_FILE), report, indent=2)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m runs.aux_pretrain",
        description="Train the tiny LTE retriever stand-in (tiny-mpnet) on the toy world's train split "
                    "(generated first under DATA_DIR/toyworld if missing), one CPU thread; print its folder "
                    "(for --aux_model_path tiny-mpnet=FOLDER) and its eval-split retrieval. Reuses a cached "
                    "one unless --force.")
    parser.add_argument("--data_dir", default="data", help="folder holding toyworld/ (default: %(default)s)")
    parser.add_argument("--records", default="records", help="cache root: <records>/pretrained/ (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the data order (default: 0)")
    parser.add_argument("--steps", type=int, default=RetrieverPretrainConfig.steps, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=RetrieverPretrainConfig.temperature,
                        help="InfoNCE temperature (default: %(default)s)")
    parser.add_argument("--no_hard_negatives", action="store_true", help="in-batch negatives only")
    parser.add_argument("--force", action="store_true", help="train again even when cached")
    ns = parser.parse_args(argv)
    try:
        if ns.steps < 1:
            raise UserError(f"--steps must be >= 1, got {ns.steps}")
        if not ns.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {ns.temperature}")
        cfg = RetrieverPretrainConfig(steps=ns.steps, seed=ns.seed, hard_negatives=not ns.no_hard_negatives,
                                      temperature=ns.temperature,
                                      warmup=min(RetrieverPretrainConfig.warmup, ns.steps))
        out = ensure_retriever(ns.data_dir, ns.records, cfg, force=ns.force, log_every=50)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(os.path.join(out, REPORT_FILE)) as f:
        report = json.load(f)
    print(f"{RETRIEVER}: trained in {report['seconds']:.0f} s; {out}")
    for setting, results in report["eval_retrieval"].items():
        for which, numbers in results.items():
            print(f"  eval, {setting} at once, {which}: " + " ".join(f"{k}={v:.3f}" for k, v in numbers.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
