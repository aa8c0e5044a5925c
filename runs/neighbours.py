"""Visual nearest neighbours of the training records, for batches that hold look-alikes (`--batch_neighbours K`).

A contrastive routing loss only learns to separate two images when both are in one batch. With
uniform batches of 8 out of thousands of records, a record's visual near neighbour is almost never
there. With K > 0 the trainer composes each batch from anchor records (drawn as without the option)
plus, for each anchor, its K nearest training records by a *visual key* computed once before training:

    visual key of a record = mean over image tokens of the frozen backbone's bridge output
                             (`vllm.encode_images`: the image tokens the language model reads), L2-normalised

Why that key: it is what every editor's routing starts from (the image as the language model sees it),
it exists for every backbone behind the one interface, it needs no trained editor module (so it is
fixed for the whole run and the data order stays a pure function of seed, epoch and step), and it costs
one vision pass per record. Records without an edit image get a zero key (cosine 0 to everything).

The keys are cached in the run folder, `<run>/neighbours/visual-keys-<key>.npy`, `<key>` a hash of the
backbone (name, weight folder, dtype) and the data fingerprint, so resuming a run reads them back instead
of recomputing (and a changed backbone or data never reuses stale keys).
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from utils.io import make_folder, write_atomic
from utils.records import EditRecord

NEIGHBOURS_DIR = "neighbours"
KEY_METHOD = "bridge-mean-l2-v1"  # bump when the key's definition changes (old caches are then not reused)


def anchors_per_batch(batch_size: int, neighbours: int) -> int:
    """Anchor records per batch: ceil(B / (K + 1)); K = 0 gives B (every record is an anchor)."""
    return -(-batch_size // (neighbours + 1))


def table_width(batch_size: int, neighbours: int) -> int:
    """Neighbours kept per record: K plus enough spares to skip records already in the batch (B - 1)."""
    return neighbours + batch_size - 1


def cache_key(backbone: str, model_path: str | None, dtype: str, fingerprint: str) -> str:
    """Hash naming one (backbone weights, data) pair's visual keys."""
    ident = {"method": KEY_METHOD, "backbone": backbone, "dtype": dtype, "data": fingerprint,
             "weights": os.path.abspath(model_path) if model_path else None}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def edit_image(record: EditRecord) -> str | None:
    """The image a record's edit is about (its first request's), or None for a text-only record."""
    return record.requests[0].image if record.requests else None


@torch.no_grad()
def image_keys(vllm, images: list) -> torch.Tensor:
    """[b, D] float32: the L2-normalised mean over image tokens of the bridge output of each image."""
    tokens = vllm.encode_images(vllm.pixel_values(images))  # [b, t, D]
    return torch.nn.functional.normalize(tokens.float().mean(1), dim=-1)  # [b, D]


def visual_keys(vllm, records: list[EditRecord], chunk: int = 64) -> np.ndarray:
    """[n, D] float32: `image_keys` of each record's edit image (zeros without one)."""
    keys: np.ndarray | None = None
    with_image = [i for i, r in enumerate(records) if edit_image(r) is not None]
    for start in range(0, len(with_image), chunk):
        rows = with_image[start:start + chunk]
        pooled = image_keys(vllm, [edit_image(records[i]) for i in rows])  # [b, D]
        if keys is None:
            keys = np.zeros((len(records), pooled.shape[1]), dtype=np.float32)  # [n, D]
        keys[rows] = pooled.cpu().numpy()
    return keys if keys is not None else np.zeros((len(records), 1), dtype=np.float32)


def cached_visual_keys(run_dir: str, key: str, compute, num_records: int) -> tuple[np.ndarray, str, bool]:
    """(keys, path, reused): the [num_records, D] keys cached under `run_dir`, else `compute()` written
    there atomically (a damaged file, or one of another row count, is recomputed and replaced)."""
    folder = make_folder(os.path.join(run_dir, NEIGHBOURS_DIR))
    path = os.path.join(folder, f"visual-keys-{key}.npy")
    if os.path.isfile(path):
        try:
            keys = np.load(path, allow_pickle=False)
            if keys.ndim == 2 and keys.shape[0] == num_records:
                return keys, path, True
        except (OSError, ValueError, EOFError):
            pass
    keys = compute()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, keys, allow_pickle=False)

    write_atomic(path, write)
    return keys, path, False


def neighbour_table(keys: np.ndarray, width: int, chunk: int = 1024) -> np.ndarray:
    """[n, min(width, n - 1)] int64: each row's other records, most cosine-similar first (ties: lower index).

    keys [n, D] L2-normalised (or zero). Deterministic for given keys (stable sort)."""
    n = keys.shape[0]
    width = min(width, n - 1)
    table = np.zeros((n, max(width, 0)), dtype=np.int64)
    if width <= 0:
        return table
    for start in range(0, n, chunk):
        sim = keys[start:start + chunk] @ keys.T  # [c, n]
        rows = np.arange(sim.shape[0])
        sim[rows, start + rows] = -np.inf  # never one's own neighbour
        order = np.argsort(-sim, axis=1, kind="stable")  # [c, n]
        table[start:start + chunk] = order[:, :width]
    return table


def compose_batch(anchors: np.ndarray, table: np.ndarray, neighbours: int, batch_size: int) -> np.ndarray:
    """Record indices of one batch: each anchor followed by its `neighbours` nearest records not yet in
    the batch, cut at `batch_size`. Anchors are distinct, so the batch never holds a record twice."""
    chosen: list[int] = []
    taken = {int(a) for a in anchors}
    for anchor in anchors:
        group = [int(anchor)]
        for candidate in table[int(anchor)]:
            if len(group) > neighbours:
                break
            if int(candidate) not in taken:
                group.append(int(candidate))
                taken.add(int(candidate))
        chosen.extend(group)
    return np.asarray(chosen[:batch_size], dtype=np.int64)
