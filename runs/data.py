"""Records of a data split for a run: the one loader that training, evaluation and the demo call.

`load_split` reads the records and reads the header of every image they use (utils.images), so a
missing, empty, corrupt or oversized image stops the run before it starts. `check_lengths` then
refuses, once the backbone is loaded, records whose prompt + target do not fit its positions.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

from toyworld import ensure_toy_data
from utils.data import TOY, canonical_dataset_name, default_data_paths, load_edit_dataset
from utils.errors import UserError
from utils.images import check_images
from utils.records import EditRecord, Sample

_LISTED_RECORDS = 5


def load_split(data_name: str, split: str, data_dir: str, limit: int | None = None) -> tuple[str, list[EditRecord]]:
    """(canonical data set name, its `split` records, the first `limit` of them).

    For TOY the default toy world is generated first when `data_dir/toyworld` holds none.
    Every image the records use must exist and have a readable header (checked once per file).
    """
    name = canonical_dataset_name(data_name)
    if name == TOY:
        ensure_toy_data(data_dir)
    json_path, image_root = default_data_paths(name, split, data_dir)
    records = load_edit_dataset(name, json_path, image_root, limit=limit)
    if not records:
        raise UserError(f"the {name} {split} data under {data_dir} has no records")
    check_images((s.image for _, _, s in record_samples(records) if s.image is not None), json_path)
    return name, records


def draw_records(records: Sequence[EditRecord], seed: int, n: int | None) -> list[EditRecord]:
    """The first `n` (all when None) of a permutation of `records` seeded by `seed`: which records
    are edited and in what order, as the authors' evaluator draws them with its random option."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[:n]]


def record_samples(records: Sequence[EditRecord]) -> Iterator[tuple[EditRecord, str, Sample]]:
    """(record, role, sample) for every sample of every record; role is e.g. "request" or "image_loc"."""
    for record in records:
        for sample in record.requests:
            yield record, "request", sample
        for groups in (record.generality, record.locality):
            for kind, samples in groups.items():
                for sample in samples:
                    yield record, kind, sample
        for sample in record.portability:
            yield record, "portability", sample


def sample_length(vllm, sample: Sample) -> int:
    """Positions the backbone uses for `sample`: its prompt + target tokens (BOS and the text after
    the image included, as `vllm.prepare` builds them) plus the image tokens of an image sample."""
    ids, _ = vllm._tokenize(sample.prompt, sample.target, sample.image is not None)
    return len(ids) + (vllm.num_image_tokens if sample.image is not None else 0)


def check_lengths(vllm, records: Sequence[EditRecord]) -> None:
    """Refuse, naming them, the records with a sample longer than the LM's `max_position_embeddings`.

    Run after the backbone is loaded and before training or evaluation starts, so an over-long record
    is not an IndexError in the middle of a run. Each distinct (prompt, target, image?) is tokenised once.
    """
    limit = getattr(vllm.stack.config, "max_position_embeddings", None)
    if not limit:
        return
    lengths: dict[tuple[str, str, bool], int] = {}
    too_long = []
    for record, role, sample in record_samples(records):
        key = (sample.prompt, sample.target, sample.image is not None)
        if key not in lengths:
            lengths[key] = sample_length(vllm, sample)
        if lengths[key] > limit:
            too_long.append((record.index, role, lengths[key]))
    if not too_long:
        return
    shown = "; ".join(f"record {index} ({role}): {n} positions" for index, role, n in too_long[:_LISTED_RECORDS])
    more = f"; ... and {len(too_long) - _LISTED_RECORDS} more" if len(too_long) > _LISTED_RECORDS else ""
    n_records = len({index for index, _, _ in too_long})
    raise UserError(
        f"{n_records} record(s) have prompt + target longer than {vllm.name}'s limit of {limit} positions "
        f"(max_position_embeddings; image samples count {vllm.num_image_tokens} image tokens): {shown}{more}. "
        f"Shorten or remove these records of the annotation file (record = position in its JSON list).")
