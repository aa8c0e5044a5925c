"""LTE-VL's locality references, computed once per run and kept on disk (no second LLM copy).

LTE's locality loss compares the LLM being trained with the ORIGINAL LLM on each training record's
locality samples. The original LLM's outputs do not depend on training, so they are computed in one
pass over the train split before the first step (`build`, with a progress bar), with the backbone
as loaded, and stored in the run folder:

    <run>/lte_locality_reference/
        manifest.json   {backbone key, data fingerprint, dtype, vocabulary, per sample [offset, rows]}
        logits.bin      the LM head's outputs [rows, V] in the backbone's dtype, one row per label
                        position of each distinct locality sample (raw bytes, read memory-mapped)

A batch reads its samples' rows and takes `.float().log_softmax(-1)` of them, the operations the
old frozen copy applied to the same LM-head output, so the KL is the same up to float rounding (the
pass groups samples in other batches than training does). A resumed run reads the folder (written
atomically: complete or absent) instead of recomputing; a folder made for another backbone or other
data is refused. Samples are keyed by content (prompt, target, image): a sample shared by several
records is stored once.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from utils.errors import UserError
from utils.io import folder_atomic, read_json, write_json_atomic
from utils.records import EditRecord, Sample
from .lte_training import reembed

FOLDER = "lte_locality_reference"
MANIFEST, LOGITS = "manifest.json", "logits.bin"
FORMAT = 1
CHUNK = 16  # samples per forward pass while building
# raw storage of a dtype's bytes: an integer type of its size (torch side for writing, numpy side for reading)
_TORCH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NUMPY_INT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def sample_key(sample: Sample) -> tuple:
    """What identifies a locality sample's reference: its content."""
    return sample.prompt, sample.target, sample.image


def locality_samples(records: list[EditRecord]) -> list[Sample]:
    """The distinct locality samples of `records` (every type, every item) in a fixed order: types in
    first-seen order, then records, then items."""
    types = list(dict.fromkeys(t for r in records for t in r.locality))
    seen, out = set(), []
    for t in types:
        for r in records:
            for s in r.locality.get(t, []):
                if sample_key(s) not in seen:
                    seen.add(sample_key(s))
                    out.append(s)
    return out


def backbone_key(vllm) -> dict:
    """Name, dtype, vocabulary and a digest of the LLM's weights (names, shapes and the first and last
    64 values of every tensor: cheap on a 7B model, and other weights give another digest)."""
    h = hashlib.sha256()
    for name, t in vllm.stack.state_dict().items():
        flat = t.detach().reshape(-1)
        ends = torch.cat([flat[:64], flat[-64:]]).contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(ends.view(torch.uint8).numpy().tobytes())
    return {"name": vllm.name, "dtype": str(vllm.dtype).replace("torch.", ""),
            "vocab": int(vllm.stack.lm_head.weight.shape[0]), "weights_digest": h.hexdigest()[:16]}


@torch.no_grad()
def lm_head_outputs(vllm, samples: list[Sample]) -> list[torch.Tensor]:
    """Per sample, the original LLM's LM-head outputs [n_i, V] at its label positions (every edit and
    input prefix off; text positions embedded by the stack, as training re-embeds them)."""
    stack = vllm.stack
    with vllm.unedited():
        batch = vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])
        b = reembed(stack, batch)
        hidden, _ = stack.hidden(b.inputs_embeds, b.attention_mask, b.position_ids, **b.layer_inputs())
        logits = stack.lm_head(hidden[b.label_mask.to(hidden.device)])  # [n, V], rows in label_mask order
    return list(logits.split(b.label_mask.sum(1).tolist()))


@dataclass
class LocalityReference:
    """The stored references of one run: `log_probs(samples, label_mask)` per training batch."""

    folder: str
    manifest: dict
    rows: np.ndarray            # memory-mapped [total rows, V] raw storage
    dtype: torch.dtype
    index: dict                 # sample key -> (offset, rows)

    def log_probs(self, samples: list[Sample], label_mask: torch.Tensor, device) -> torch.Tensor:
        """Log-probabilities [n, V] (float32, on `device`) of the original LLM at the label positions of
        `samples` (a batch's rows in order; `label_mask` [b, l] says how many positions each has)."""
        parts = []
        for s, want in zip(samples, label_mask.sum(1).tolist()):
            found = self.index.get(sample_key(s))
            if found is None:
                raise RuntimeError(f"locality sample {s.prompt!r} -> {s.target!r} is not in {self.folder} "
                                   f"(it holds the train split's locality samples only)")
            offset, n = found
            if n != want:
                raise RuntimeError(f"{self.folder}: locality sample {s.prompt!r} has {n} stored positions, "
                                   f"the batch has {want} (another tokenizer?)")
            parts.append(torch.from_numpy(np.array(self.rows[offset:offset + n])))
        stored = torch.cat(parts).view(self.dtype).to(device)  # [n, V] as the LM head gave it
        return stored.float().log_softmax(-1)


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(name)
    return dtype


def build(vllm, records: list[EditRecord], folder: str, fingerprint: str) -> None:
    """Compute every distinct locality sample's LM-head outputs with `vllm` as it is now (the original
    LLM) and write `folder` atomically (a Ctrl-C leaves nothing)."""
    samples = locality_samples(records)
    vocab, dtype = int(vllm.stack.lm_head.weight.shape[0]), vllm.dtype
    entries, offset = [], 0
    with folder_atomic(folder) as tmp:
        with open(os.path.join(tmp, LOGITS), "wb") as f, \
                tqdm(total=len(samples), unit="sample", desc="LTE locality references (once per run)",
                     dynamic_ncols=True) as bar:
            for start in range(0, len(samples), CHUNK):
                for logits in lm_head_outputs(vllm, samples[start:start + CHUNK]):
                    raw = logits.contiguous().cpu().view(_TORCH_INT[logits.element_size()])
                    f.write(raw.numpy().tobytes())
                    entries.append([offset, len(logits)])
                    offset += len(logits)
                bar.update(min(CHUNK, len(samples) - start))
            f.flush()
            os.fsync(f.fileno())
        write_json_atomic(os.path.join(tmp, MANIFEST), {
            "what": "LTE-VL locality references: the original LLM's LM-head outputs at the label positions of "
                    "each distinct locality sample of the train split (editors/baselines/lte_reference.py)",
            "format": FORMAT, "backbone": backbone_key(vllm), "data_fingerprint": fingerprint,
            "dtype": str(dtype).replace("torch.", ""), "vocab": vocab, "num_samples": len(samples),
            "num_rows": offset, "entries": entries}, indent=None)


def open_reference(vllm, records: list[EditRecord], folder: str, fingerprint: str) -> LocalityReference:
    """Read `folder` and check it was made for this backbone and this data; UserError otherwise."""
    path = os.path.join(folder, MANIFEST)
    redo = f"delete {folder} to compute it again from the backbone as loaded (before any step)"
    manifest = read_json(path, hint=redo, kind=dict)
    try:
        fmt, backbone, data = manifest["format"], manifest["backbone"], manifest["data_fingerprint"]
        dtype, vocab, num_rows = _dtype_of(manifest["dtype"]), int(manifest["vocab"]), int(manifest["num_rows"])
        entries = [(int(o), int(n)) for o, n in manifest["entries"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path} is corrupt (bad or missing {exc}); {redo}") from None
    if fmt != FORMAT:
        raise UserError(f"{path} has format {fmt!r}, this version reads {FORMAT}; {redo}")
    here = backbone_key(vllm)
    if backbone != here:
        diff = ", ".join(f"{k} {backbone.get(k)!r} != {here[k]!r}" for k in here if backbone.get(k) != here[k])
        raise UserError(f"LTE locality references {folder} were made for another backbone ({diff}); resume "
                        f"with the backbone the run started with (-mn, --model_path, --dtype), or {redo}")
    if data != fingerprint:
        raise UserError(f"LTE locality references {folder} were made for other training data (data fingerprint "
                        f"{str(data)[:12]} != {fingerprint[:12]}); use the run's data (-dna, -dn, --data_dir), "
                        f"or {redo}")
    samples = locality_samples(records)
    if len(entries) != len(samples):
        raise UserError(f"{path} holds {len(entries)} locality samples, the data has {len(samples)}; {redo}")
    size = torch.empty(0, dtype=dtype).element_size()
    logits_path = os.path.join(folder, LOGITS)
    expected = num_rows * vocab * size
    actual = os.path.getsize(logits_path) if os.path.isfile(logits_path) else None
    if actual != expected:
        raise UserError(f"{logits_path} is missing or truncated ({actual} bytes, expected {expected}); {redo}")
    rows = (np.memmap(logits_path, dtype=_NUMPY_INT[size], mode="r", shape=(num_rows, vocab)) if num_rows
            else np.zeros((0, vocab), dtype=_NUMPY_INT[size]))  # no locality samples: nothing to map
    index = dict(zip(map(sample_key, samples), entries))
    return LocalityReference(folder, manifest, rows, dtype, index)


def prepare(vllm, records: list[EditRecord], run_dir: str, fingerprint: str, say=None) -> LocalityReference:
    """The run's references: read from `run_dir` if there (a resumed run), else computed now (the backbone
    must still hold its original weights: the trainer calls this before it loads a checkpoint)."""
    folder = os.path.join(run_dir, FOLDER)
    if not os.path.isdir(folder):
        build(vllm, records, folder, fingerprint)
    elif say is not None:
        say(f"LTE locality references: reading {folder} (computed when the run started)")
    return open_reference(vllm, records, folder, fingerprint)
