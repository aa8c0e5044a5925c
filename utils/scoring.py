"""Batched scoring of (prompt, image, target) samples on a backbone, with its editor's hooks active.

Two measurements (spec §9.1, plus the generation-based one the reference lacks):
- teacher forcing: the argmax token id at each of a sample's label positions (`predict`,
  `teacher_forced`); `token_accuracy` compares them with the target ids (reliability,
  generality, portability) or with the unedited model's ids (locality);
- greedy generation of as many tokens as the target has (`generate_answers`); `exact_match`
  compares the stripped text with the stripped target (case-sensitive), or a post-edit
  generation with the pre-edit one (locality).

Batching never changes a number: rows are independent (per-row attention masks and positions),
samples are sorted by length into batches to limit padding, and results come back in input
order. Generation batches only hold samples that decode the same number of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from utils.images import ImageCache
from utils.records import Sample

_IMAGES = ImageCache(max_items=512)  # the same picture serves a record's request, rephrase and edit


@dataclass
class TeacherForced:
    """Per sample, in input order: argmax ids and target ids at the label positions."""

    predicted: list[list[int]]
    labels: list[list[int]]


# ---- batching ----------------------------------------------------------------------------------

def approximate_lengths(vllm, samples: Sequence[Sample]) -> list[int]:
    """Rough sequence length of each sample (text tokens + image tokens), only used for sorting."""
    texts = [f"{s.prompt} {s.target}" for s in samples]
    ids = vllm.tokenizer(texts)["input_ids"] if texts else []
    return [len(t) + (vllm.num_image_tokens if s.image is not None else 0) for t, s in zip(ids, samples)]


def sorted_batches(keys: Sequence, batch_size: int, group: Sequence | None = None) -> list[list[int]]:
    """Indices sorted by `keys`, cut into batches of at most `batch_size`.

    With `group`, a batch never mixes two group values (e.g. different generation lengths).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    group = group if group is not None else [0] * len(keys)
    order = sorted(range(len(keys)), key=lambda i: (group[i], keys[i]))
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == batch_size or group[batches[-1][0]] != group[i]:
            batches.append([])
        batches[-1].append(i)
    return batches


def _images(samples: Sequence[Sample]) -> list:
    return [_IMAGES.get(s.image) if s.image is not None else None for s in samples]


def _bar(batches: list, desc: str | None, show_progress: bool):
    return tqdm(batches, desc=desc, leave=False, disable=not show_progress, unit="batch")


# ---- teacher forcing ---------------------------------------------------------------------------

@torch.no_grad()
def teacher_forced(vllm, samples: Sequence[Sample], batch_size: int = 16, desc: str | None = None,
                   show_progress: bool = False) -> TeacherForced:
    """Argmax ids and target ids at every sample's label positions (one forward per batch)."""
    predicted: list[list[int]] = [[] for _ in samples]
    labels: list[list[int]] = [[] for _ in samples]
    batches = sorted_batches(approximate_lengths(vllm, samples), batch_size)
    for rows in _bar(batches, desc, show_progress):
        chunk = [samples[i] for i in rows]
        batch = vllm.prepare([s.prompt for s in chunk], _images(chunk), [s.target for s in chunk])
        argmax = vllm(batch).argmax(-1)  # [b, l]
        for j, i in enumerate(rows):
            where = batch.label_mask[j]  # [l]
            predicted[i] = argmax[j][where].tolist()
            labels[i] = batch.labels[j][where].tolist()
    return TeacherForced(predicted, labels)


def predict(vllm, samples: Sequence[Sample], batch_size: int = 16) -> list[list[int]]:
    """Argmax token ids at each sample's label positions, in input order."""
    return teacher_forced(vllm, samples, batch_size).predicted


def token_accuracy(predicted: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of positions where `predicted` equals `reference` (0.0 for an empty target)."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predictions for {len(reference)} reference tokens")
    if not reference:
        return 0.0
    return sum(int(p == r) for p, r in zip(predicted, reference)) / len(reference)


def decode(vllm, ids: Sequence[int]) -> str:
    """Text of predicted ids, as the reference writes `predict_after_edit`."""
    return vllm.tokenizer.decode(list(ids))


# ---- generation --------------------------------------------------------------------------------

def generate_answers(vllm, samples: Sequence[Sample], num_tokens: Sequence[int], batch_size: int = 16,
                     desc: str | None = None, show_progress: bool = False) -> list[str]:
    """Greedy continuation of each prompt, `num_tokens[i]` new tokens for sample i (input order)."""
    if len(num_tokens) != len(samples):
        raise ValueError(f"{len(num_tokens)} token counts for {len(samples)} samples")
    out = [""] * len(samples)
    lengths = approximate_lengths(vllm, samples)
    for rows in _bar(sorted_batches(lengths, batch_size, group=list(num_tokens)), desc, show_progress):
        chunk = [samples[i] for i in rows]
        if num_tokens[rows[0]] < 1:
            continue
        texts = vllm.generate([s.prompt for s in chunk], _images(chunk), max_new_tokens=num_tokens[rows[0]])
        for i, text in zip(rows, texts):
            out[i] = text
    return out


def exact_match(generated: str, reference: str) -> float:
    """1.0 when the stripped strings are equal (case-sensitive), else 0.0."""
    return float(generated.strip() == reference.strip())

