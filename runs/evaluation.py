"""Sequential editing evaluation of any `Editor` (spec §9.2), with resume, lifelong mode and plots.

Chunked protocol (the paper's, so numbers compare): split the records into consecutive chunks
of `sequential_edit_n` edits (a trailing partial chunk is KEPT and reported with its size). Per
chunk: record the unedited model's locality predictions; apply the chunk's edits (one request
per `edit` call, timed with a CUDA sync; or one batched call when the editor says
`supports_batch_edit`, each edit then gets total / n); score reliability, generality, locality
and portability of the chunk's records with all of its edits in place; `restore()`.

Lifelong mode (`lifelong=True`): the same chunks, but the editor is never restored, locality is
measured against the ORIGINAL model (its predictions are computed once, before any edit), and
after the N-th edit for N = 1, 10, 100, ... and the last edit, the records edited so far are
scored (at most `lifelong_sample_n` of them: a uniform sample without replacement, seeded by
(seed, N), so a resumed run draws the same one). After each chunk the editor's edits are saved
(`save_edits`, when supported) so that a killed run reloads them instead of re-editing.

Files, under `<results_dir>/<editor>/<model>/<DATA>[-postfix]/{sequential,lifelong}_edit_<n>/`:
    results.json, mean_results.json   spec §9.4 layout (+ "exact_match" per item, + "run")
    lifelong.json                     lifelong mode: metrics at each checkpoint
    metrics_vs_edits.png              each metric against the chunk index / number of edits
    tb/                               TensorBoard scalars, one step per chunk (and checkpoint)
    progress/                         one JSON per finished chunk (full precision); the final
                                      files are rebuilt from these, and a rerun resumes after
                                      the last finished chunk
    .lock                             held while a run writes here: a second run into the same
                                      folder is refused (a dead holder's lock is taken over)

Under torchrun the chunks of the sequential protocol are shared out over the ranks
(`runs/eval_shards.py`); the chunks are independent, so the files are those of one process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from editors.checkpoint import locate_checkpoint
from utils.errors import UserError
from utils.io import folder_atomic, folder_lock, make_folder, read_json, write_json_atomic
from utils.memory import peak_memory, reset_peak
from utils.names import safe_name_part
from utils.records import EditRecord, Sample, data_fingerprint
from utils.scoring import decode, exact_match, generate_answers, teacher_forced, token_accuracy

from runs.eval_config import EvalConfig
from runs.results import GROUP_ORDER, ScalarLog, mean_results, plot_metrics, round_floats
from runs.routing_report import expert_index, mean_report, routing_report

class ResultsMismatch(UserError):
    """The results folder holds a run with another identity (`in_owned_folder` starts it over)."""


def in_owned_folder(evaluate_with, cfg: EvalConfig, say=print):
    """`evaluate_with(cfg)` into a results folder its caller owns (the demo's, a table cell's): results of
    another configuration there are stale and started over instead of refused; an interrupted evaluation
    of the same configuration still resumes."""
    try:
        return evaluate_with(cfg)
    except ResultsMismatch as mismatch:
        say(f"starting over: {mismatch}")
        return evaluate_with(dataclasses.replace(cfg, overwrite=True))


OUTPUT_FILES = ("results.json", "mean_results.json", "lifelong.json", "metrics_vs_edits.png")
EDITS_MARKER = "_evaluation_chunks_done.json"


@dataclass
class EvalOutcome:
    """What `evaluate` did and where the files are."""

    folder: str
    total_mean: dict
    split_mean: list[dict]
    run: dict
    chunks_run: int
    chunks_resumed: int
    lifelong: list[dict] | None = None

    @property
    def already_complete(self) -> bool:
        return self.chunks_run == 0 and self.chunks_resumed > 0


# ---- records -> items ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One scored sample: `group` is reliability / generality / locality / portability."""

    record: int           # position of its record in the evaluated list
    group: str
    kind: str | None      # "text_rephrase", "image_loc", ...; None for reliability / portability
    index: int            # position in its list
    sample: Sample

    @property
    def key(self) -> str:
        return f"{self.record}/{self.group}/{self.kind}/{self.index}"


def record_items(records: Sequence[EditRecord], positions: Iterable[int]) -> list[Item]:
    """Every sample of the records at `positions`, in result-file order."""
    items = []
    for pos in positions:
        r = records[pos]
        for kind, samples in r.generality.items():
            items += [Item(pos, "generality", kind, i, s) for i, s in enumerate(samples)]
        for kind, samples in r.locality.items():
            items += [Item(pos, "locality", kind, i, s) for i, s in enumerate(samples)]
        items += [Item(pos, "portability", None, i, s) for i, s in enumerate(r.portability)]
        items += [Item(pos, "reliability", None, i, s) for i, s in enumerate(r.requests)]
    return items


def split_into_chunks(records: Sequence[EditRecord], edit_n: int, keep_partial: bool = False) -> list[list[int]]:
    """Record positions per chunk; a chunk closes once it holds `edit_n` requests.

    A trailing chunk with fewer requests is dropped, as the authors' `split_data` does (so totals
    match the paper's), unless `keep_partial`. No full chunk at all is a UserError.
    """
    if edit_n < 1:
        raise UserError(f"sequential_edit_n must be at least 1, got {edit_n} (-sen)")
    chunks, current, count = [], [], 0
    for pos, record in enumerate(records):
        current.append(pos)
        count += len(record.requests)
        if count >= edit_n:
            chunks.append(current)
            current, count = [], 0
    if current and keep_partial:
        chunks.append(current)
    if not chunks:
        raise UserError(f"{len(records)} records hold fewer than -sen {edit_n} edits, so there is no full chunk: "
                        f"lower -sen, read more records (-dsn), or pass --keep_partial_chunk")
    return chunks


# ---- pre-edit predictions and scoring ------------------------------------------------------------

def _predict(vllm, items: list[Item], cfg: EvalConfig, stage: str):
    """Teacher-forced predictions of `items` and, with exact match on, their greedy generations."""
    samples = [it.sample for it in items]
    tf = teacher_forced(vllm, samples, cfg.batch_size, stage, cfg.show_progress)
    generated = [None] * len(items)
    if cfg.exact_match:
        generated = generate_answers(vllm, samples, [len(x) for x in tf.labels], cfg.batch_size,
                                     f"{stage} (generate)", cfg.show_progress)
    return tf, generated


def predict_before_edit(vllm, items: list[Item], cfg: EvalConfig) -> dict[str, dict]:
    """Locality reference of each item on the current (unedited) model: ids, text, generation."""
    tf, generated = _predict(vllm, items, cfg, "preparing")
    return {it.key: {"ids": ids, "text": decode(vllm, ids), "generated": gen}
            for it, ids, gen in zip(items, tf.predicted, generated)}


def score_records(vllm, records: Sequence[EditRecord], positions: Sequence[int], pre: dict[str, dict],
                  edit_times: dict[str, float] | None, cfg: EvalConfig) -> list[dict]:
    """Per-record results (spec §9.4 layout) of the records at `positions`, edits in place."""
    items = record_items(records, positions)
    tf, generated = _predict(vllm, items, cfg, "scoring")
    by_record: dict[int, dict] = {pos: {} for pos in positions}
    for it, ids, labels, gen in zip(items, tf.predicted, tf.labels, generated):
        result = _item_result(vllm, it, ids, labels, gen, pre, edit_times, cfg.exact_match)
        groups = by_record[it.record]
        if it.kind is None:
            groups.setdefault(it.group, []).append(result)
        else:
            groups.setdefault(it.group, {}).setdefault(it.kind, []).append(result)
    return [{g: by_record[pos][g] for g in GROUP_ORDER if g in by_record[pos]} for pos in positions]


def _item_result(vllm, it: Item, ids: list[int], labels: list[int], generated: str | None,
                 pre: dict[str, dict], edit_times: dict[str, float] | None, with_em: bool) -> dict:
    s = it.sample
    out: dict[str, Any] = {"image": s.image, "prompt": s.prompt, "target": s.target}
    if it.group == "reliability" and edit_times is not None:
        out["edit_time"] = edit_times[it.key]
    if it.group == "locality":
        before = pre[it.key]
        out["predict_before_edit"] = before["text"]
        out["predict_after_edit"] = decode(vllm, ids)
        out["acc"] = token_accuracy(ids, before["ids"])
        if with_em:
            out["exact_match"] = exact_match(generated, before["generated"])
        return out
    out["predict_after_edit"] = decode(vllm, ids)
    out["acc"] = token_accuracy(ids, labels)
    if with_em:
        out["exact_match"] = exact_match(generated, s.target)
    return out


# ---- editing ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def apply_edits(editor, requests: list[Sample], bar=None) -> list[float]:
    """Edit `requests` in order; seconds per edit (a batched call's time is split evenly)."""
    if not requests:
        return []
    device = editor.vllm.device
    if editor.supports_batch_edit:
        _sync(device)
        start = time.perf_counter()
        editor.edit(list(requests))
        _sync(device)
        if bar is not None:
            bar.update(len(requests))
        return [(time.perf_counter() - start) / len(requests)] * len(requests)
    times = []
    for request in requests:
        _sync(device)
        start = time.perf_counter()
        editor.edit([request])
        _sync(device)
        times.append(time.perf_counter() - start)
        if bar is not None:
            bar.update(1)
    return times


def _is_main_edit(key: str) -> bool:
    return "/reliability/" in key


def _edit_units(run: "_Run", positions: Iterable[int]) -> list[tuple[str, Sample]]:
    """Every edit of the records at `positions` in order: each record's requests, then (VLKEB one-hop,
    `portability_second_edit`) its second, text-only edits port_edit_q -> port_edit_a.

    An editor that cannot edit text-only requests (LiveEdit's hard routing needs an image) gets the
    second edit with the record's image; the results say so (`run.portability_edit_image`).
    """
    units = []
    for pos in positions:
        record = run.records[pos]
        units += [(f"{pos}/reliability/None/{i}", s) for i, s in enumerate(record.requests)]
        if run.cfg.portability_second_edit:
            image = None if run.editor.edits_text_only else record.requests[0].image
            units += [(f"{pos}/portability_edit/None/{i}", Sample(s.prompt, s.target, image))
                      for i, s in enumerate(record.portability_edits)]
    return units


# ---- files --------------------------------------------------------------------------------------

def run_folder(cfg: EvalConfig, editor_name: str, model_name: str) -> str:
    """`<results_dir>/<editor>/<model>/<DATA>[-postfix]/{sequential,lifelong}_edit_<n>`."""
    postfix = safe_name_part(cfg.eval_name_postfix, "-enp/--eval_name_postfix") if cfg.eval_name_postfix else ""
    name = cfg.data_name.upper() + (f"-{postfix}" if postfix else "")
    mode = "lifelong_edit" if cfg.lifelong else "sequential_edit"
    return os.path.join(cfg.results_dir, editor_name, model_name, name, f"{mode}_{cfg.sequential_edit_n}")


def run_identity(cfg: EvalConfig, editor, records: Sequence[EditRecord], editor_name: str, model_name: str) -> dict:
    """Everything that changes the numbers; a resumed run must match it exactly."""
    config = editor.config
    editor_config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
    # the backbone's weight folder: the same name with other weights must not reuse these results
    backbone_source = getattr(getattr(editor, "vllm", None), "source", None)
    # the checkpoint as the real path of the step folder (or file) it names now: a run folder whose
    # `latest` moved since the first start gives another identity, so two checkpoints never mix
    checkpoint = locate_checkpoint(cfg.editor_checkpoint)[1] if cfg.editor_checkpoint else None
    identity = {"editor": editor_name, "model": model_name, "backbone_source": backbone_source,
                "dtype": str(editor.vllm.dtype).replace("torch.", ""),
                "data": cfg.data_name.upper(),
                "eval_name_postfix": cfg.eval_name_postfix, "sequential_edit_n": cfg.sequential_edit_n,
                "lifelong": cfg.lifelong, "exact_match": cfg.exact_match, "seed": cfg.seed,
                "data_sample_n": cfg.data_sample_n, "editor_checkpoint": checkpoint,
                "editor_config": editor_config, "n_records": len(records),
                "data_fingerprint": data_fingerprint(records)}
    # auxiliary models (a retriever, a scope classifier) change the numbers as weights do
    identity["aux_model_paths"] = [f"{name}={os.path.realpath(folder)}"
                                   for name, folder in (p.split("=", 1) for p in cfg.aux_model_paths)]
    identity["protocol"] = {"keep_partial_chunk": cfg.keep_partial_chunk,
                            "portability_second_edit": cfg.portability_second_edit}
    if cfg.lifelong:
        identity["lifelong_sample_n"] = cfg.lifelong_sample_n
    if cfg.record_seed is not None:  # absent otherwise, so results made before the flag still resume
        identity["record_seed"] = cfg.record_seed
    return json.loads(json.dumps(identity))


CORRUPT_HINT = "delete it, or pass --overwrite to start this evaluation over"


class Progress:
    """The `progress/` folder: run identity, one JSON per finished chunk, lifelong extras.

    Every file here is read through `read`, so an empty or corrupt one (a full disk, a copy cut
    short) is one `UserError` naming it with the hint to pass --overwrite.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.dir = os.path.join(folder, "progress")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def read(self, path: str) -> dict:
        """The JSON object in `path` (a progress file), or a UserError naming it with the --overwrite hint."""
        return read_json(path, hint=CORRUPT_HINT, kind=dict)

    def lock(self):
        """Context manager: hold the folder's lock while this run writes into it."""
        return folder_lock(self.folder, "another evaluation")

    def clear(self) -> None:
        """Remove the files this module writes (nothing else in the folder is touched)."""
        for name in ("progress", "tb"):
            shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
        for name in OUTPUT_FILES:
            if os.path.isfile(os.path.join(self.folder, name)):
                os.remove(os.path.join(self.folder, name))

    def start(self, identity: dict, config: dict) -> None:
        """Create the folder, or check that the stored identity matches (else refuse)."""
        make_folder(self.dir)
        run_path = self.path("run.json")
        if os.path.isfile(run_path):
            stored = self.read(run_path).get("identity")
            if not isinstance(stored, dict):
                raise UserError(f"{run_path} is corrupt (it has no run identity); {CORRUPT_HINT}")
            differing = sorted(k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k))
            if differing:
                raise ResultsMismatch(
                    f"{self.folder} holds results of a run with a different configuration (differs in: "
                    f"{', '.join(differing)}). Pass --overwrite to start over, or choose another "
                    f"-enp/--eval_name_postfix or --results_dir.")
            return
        write_json_atomic(run_path, {"identity": identity, "config": config, "created": time.time()})

    def chunk_path(self, k: int) -> str:
        return self.path(f"chunk_{k:05d}.json")

    def finished_chunks(self, n_chunks: int) -> int:
        """How many chunks from the first are finished (each one read, so a corrupt one is named now)."""
        k = 0
        while k < n_chunks and os.path.isfile(self.chunk_path(k)):
            self.read(self.chunk_path(k))
            k += 1
        return k

    def load_chunks(self, n: int) -> list[dict]:
        return [self.read(self.chunk_path(k)) for k in range(n)]

    def checkpoint_path(self, n_edits: int) -> str:
        return self.path(f"checkpoint_{n_edits:09d}.json")


# ---- lifelong helpers ---------------------------------------------------------------------------

def lifelong_checkpoints(total_edits: int) -> list[int]:
    """1, 10, 100, ... up to `total_edits`, plus `total_edits` itself."""
    points, n = [], 1
    while n <= total_edits:
        points.append(n)
        n *= 10
    if total_edits and total_edits not in points:
        points.append(total_edits)
    return points


def checkpoint_sample(n_edited: int, n_edits: int, cfg: EvalConfig) -> list[int]:
    """Which of the first `n_edited` records a checkpoint scores (sorted, seeded by (seed, N))."""
    if n_edited <= cfg.lifelong_sample_n:
        return list(range(n_edited))
    rng = np.random.default_rng([cfg.seed, n_edits])
    return sorted(int(i) for i in rng.choice(n_edited, size=cfg.lifelong_sample_n, replace=False))


def _save_edits(editor, progress: Progress, chunks_done: int) -> bool:
    """Save the editor's edits after `chunks_done` chunks (swapped in atomically); False if unsupported."""
    if not editor.saves_edits:
        return False
    with folder_atomic(progress.path("edits")) as tmp:
        editor.save_edits(tmp)
        write_json_atomic(os.path.join(tmp, EDITS_MARKER), {"chunks_done": chunks_done})
    return True


def _reload_edits(editor, progress: Progress, chunks_done: int) -> bool:
    """Load the saved edits if they were saved after exactly `chunks_done` chunks."""
    final = progress.path("edits")
    marker = os.path.join(final, EDITS_MARKER)
    if not editor.saves_edits or not os.path.isfile(marker) or progress.read(marker).get("chunks_done") != chunks_done:
        return False
    editor.load_edits(final)
    return True


# ---- the protocol -------------------------------------------------------------------------------

@dataclass
class _Run:
    """State of one `evaluate` call."""

    editor: Any
    records: Sequence[EditRecord]
    cfg: EvalConfig
    chunks: list[list[int]]
    progress: Progress
    log: ScalarLog
    pre: dict[str, dict] = field(default_factory=dict)   # lifelong: locality reference of every record
    expert_of: dict[int, int] = field(default_factory=dict)  # lifelong: record -> index of its expert
    checkpoints: list[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)            # this call's EvalConfig (+ device), for "run"

    @property
    def vllm(self):
        return self.editor.vllm


def evaluate(editor, records: Sequence[EditRecord], cfg: EvalConfig, group=None) -> EvalOutcome | None:
    """Run (or resume) the sequential evaluation of `editor` on `records`; write and return results.

    `group` (runs/distributed.py) of a torchrun launch shares the chunks out over the ranks; rank 0
    returns the outcome, the other ranks None."""
    if group is not None and group.distributed:
        from runs.eval_shards import evaluate_sharded

        return evaluate_sharded(editor, records, cfg, group)
    if not records:
        raise UserError("no records to evaluate (check the dataset and -dsn)")
    if cfg.batch_size < 1:
        raise UserError(f"eval batch size must be at least 1, got {cfg.batch_size} (--eval_batch_size)")
    editor_name = cfg.editor_name or editor.name
    model_name = cfg.model_name or editor.vllm.name
    folder = run_folder(cfg, editor_name, model_name)
    progress = Progress(folder)
    with progress.lock():
        return _evaluate_locked(editor, records, cfg, progress, editor_name, model_name)


def _evaluate_locked(editor, records: Sequence[EditRecord], cfg: EvalConfig, progress: Progress,
                     editor_name: str, model_name: str) -> EvalOutcome:
    """`evaluate` once the results folder is locked for this process."""
    folder = progress.folder
    if cfg.overwrite:
        progress.clear()
    config = dataclasses.asdict(cfg) | {"device": str(editor.vllm.device)}
    progress.start(run_identity(cfg, editor, records, editor_name, model_name), config)
    chunks = split_into_chunks(records, cfg.sequential_edit_n, keep_partial=cfg.keep_partial_chunk or cfg.lifelong)
    done = progress.finished_chunks(len(chunks))
    # chunks this call runs: after `done`, those without a file (a torchrun rank may have finished later ones)
    to_run = len(chunks) - done if cfg.lifelong else sum(not os.path.isfile(progress.chunk_path(k))
                                                         for k in range(done, len(chunks)))
    run = _Run(editor, records, cfg, chunks, progress, ScalarLog(folder, cfg.tensorboard and done < len(chunks)),
               config=config)
    editor.restore()
    reset_peak(editor.vllm.device)
    try:
        if done < len(chunks):
            if cfg.lifelong:
                _lifelong_setup(run, done)
            _run_chunks(run, done)
    finally:
        editor.restore()
        run.log.close()
    return _finalize(run, folder, chunks_run=to_run, chunks_resumed=len(chunks) - to_run)


def _run_chunks(run: _Run, start: int) -> None:
    bar = tqdm(total=len(run.chunks), initial=start, desc="chunks", unit="chunk", disable=not run.cfg.show_progress)
    for k in range(start, len(run.chunks)):
        if not run.cfg.lifelong and os.path.isfile(run.progress.chunk_path(k)):  # finished by a torchrun rank
            bar.update(1)
            continue
        summary = _lifelong_chunk(run, k) if run.cfg.lifelong else _chunk(run, k)
        write_json_atomic(run.progress.chunk_path(k), summary, indent=None)
        run.log.log(summary["mean"], k + 1)
        run.log.log(summary.get("routing") or {}, k + 1, prefix="routing/")
        bar.update(1)
    bar.close()


def _chunk(run: _Run, k: int) -> dict:
    """Chunked protocol: pre-edit locality, edits, scoring, restore."""
    positions = run.chunks[k]
    start = time.perf_counter()
    loc_items = [it for it in record_items(run.records, positions) if it.group == "locality"]
    pre = predict_before_edit(run.vllm, loc_items, run.cfg)
    prepare_time = time.perf_counter() - start
    units = _edit_units(run, positions)
    try:
        edit_times = _edit(run, units)
        results, score_time = _score(run, positions, pre, edit_times)
        routing = _routing(run, positions, expert_index(run.records, positions, [key for key, _ in units]))
    finally:
        run.editor.restore()
    return _summary(k, positions, results, edit_times, score_time, prepare_time) | {"routing": routing}


def _routing(run: _Run, positions: Sequence[int], own: dict[int, int]) -> dict | None:
    """Routing diagnostics of the records at `positions` (None when off or the editor does not route)."""
    if not run.cfg.routing_diagnostics:
        return None
    return routing_report(run.editor, run.records, positions, own, run.cfg.batch_size)


def _edit(run: _Run, requests: list[tuple[str, Sample]]) -> dict[str, float]:
    bar = tqdm(total=len(requests), desc="editing", unit="edit", leave=False, disable=not run.cfg.show_progress)
    times = apply_edits(run.editor, [s for _, s in requests], bar)
    bar.close()
    return {key: t for (key, _), t in zip(requests, times)}


def _score(run: _Run, positions: Sequence[int], pre: dict, edit_times: dict | None) -> tuple[list[dict], float]:
    start = time.perf_counter()
    results = score_records(run.vllm, run.records, positions, pre, edit_times, run.cfg)
    return results, time.perf_counter() - start


def _summary(k: int, positions: list[int], results: list[dict], edit_times: dict, score_time: float,
             prepare_time: float) -> dict:
    n_samples = sum(len(v) if isinstance(v, list) else sum(map(len, v.values()))
                    for r in results for v in r.values())
    main = {key: t for key, t in edit_times.items() if _is_main_edit(key)}
    second = [t for key, t in edit_times.items() if not _is_main_edit(key)]
    return {"chunk": k, "positions": positions, "n_edits": len(main),
            "edit_time_s": float(sum(main.values())), "n_second_edits": len(second),
            "second_edit_time_s": float(sum(second)), "score_time_s": score_time,
            "prepare_time_s": prepare_time, "n_scored_records": len(results), "n_scored_samples": n_samples,
            "mean": mean_results(results), "results": results}


# ---- lifelong mode ------------------------------------------------------------------------------

def _lifelong_setup(run: _Run, done: int) -> None:
    """Locality reference of the original model, then the edits of the finished chunks."""
    pre_path = run.progress.path("pre_edit.json")
    if os.path.isfile(pre_path):
        run.pre = run.progress.read(pre_path)
    else:
        loc_items = [it for it in record_items(run.records, range(len(run.records))) if it.group == "locality"]
        run.pre = predict_before_edit(run.vllm, loc_items, run.cfg)
        write_json_atomic(pre_path, run.pre, indent=None)
    total = sum(len(r.requests) for r in run.records)
    run.checkpoints = lifelong_checkpoints(total)
    keys = [key for chunk in run.chunks for key, _ in _edit_units(run, chunk)]
    run.expert_of = expert_index(run.records, range(len(run.records)), keys)
    if done and not _reload_edits(run.editor, run.progress, done):
        replay = [s for k in range(done) for _, s in _edit_units(run, run.chunks[k])]
        bar = tqdm(total=len(replay), desc="replaying edits", unit="edit", leave=False,
                   disable=not run.cfg.show_progress)
        apply_edits(run.editor, replay, bar)
        bar.close()


def _lifelong_chunk(run: _Run, k: int) -> dict:
    """Edits of chunk k on top of all earlier ones, stopping at checkpoints; then score and save."""
    positions = run.chunks[k]
    units = _edit_units(run, positions)
    # units[:after_main[m]] holds the first m main edits and the second edits that follow them
    after_main = [0] + [i + 1 for i, (key, _) in enumerate(units) if _is_main_edit(key)]
    for m in range(1, len(after_main)):
        while after_main[m] < len(units) and not _is_main_edit(units[after_main[m]][0]):
            after_main[m] += 1
    n_main = len(after_main) - 1
    before = sum(len(run.records[p].requests) for c in run.chunks[:k] for p in c)
    # cumulative edit count after each record of this chunk (a record counts once all its requests are in)
    ends = np.cumsum([len(run.records[p].requests) for p in positions]) + before
    edit_times: dict[str, float] = {}
    cut = 0
    stops = sorted({c for c in run.checkpoints if before < c <= before + n_main} | {before + n_main})
    for n in stops:
        edit_times |= _edit(run, units[cut:after_main[n - before]])
        cut = after_main[n - before]
        if n in run.checkpoints and not os.path.isfile(run.progress.checkpoint_path(n)):
            n_edited = positions[0] + int(np.searchsorted(ends, n, side="right"))
            _checkpoint(run, n, n_edited)
    results, score_time = _score(run, positions, run.pre, edit_times)
    routing = _routing(run, positions, run.expert_of)
    _save_edits(run.editor, run.progress, k + 1)
    return _summary(k, positions, results, edit_times, score_time, 0.0) | {"routing": routing}


def _checkpoint(run: _Run, n_edits: int, n_edited: int) -> None:
    """Score (a sample of) the first `n_edited` records with `n_edits` edits in place."""
    positions = checkpoint_sample(n_edited, n_edits, run.cfg)
    results, score_time = _score(run, positions, run.pre, None)
    entry = {"edits": n_edits, "edited_records": n_edited, "scored_records": len(positions),
             "score_time_s": score_time, "mean": mean_results(results),
             "routing": _routing(run, positions, run.expert_of)}
    write_json_atomic(run.progress.checkpoint_path(n_edits), entry, indent=None)
    run.log.log(entry["mean"], n_edits, prefix="lifelong/")
    run.log.log(entry["routing"] or {}, n_edits, prefix="lifelong/routing/")


# ---- final files --------------------------------------------------------------------------------

def _finalize(run: _Run, folder: str, chunks_run: int, chunks_resumed: int) -> EvalOutcome:
    """Rebuild results.json, mean_results.json (and lifelong.json, the plot) from progress/."""
    chunks = run.progress.load_chunks(len(run.chunks))
    results = [c["results"] for c in chunks]
    total_edits = sum(c["n_edits"] for c in chunks)
    total_mean = mean_results([r for chunk in results for r in chunk]) | {"total_edit_n": total_edits}
    split_mean = [c["mean"] | {"sequential_edit_n": c["n_edits"]} for c in chunks]
    run_info = _run_info(run, chunks, chunks_run, chunks_resumed)
    routing = mean_report([c.get("routing") for c in chunks])
    write_json_atomic(os.path.join(folder, "results.json"), round_floats(results))
    write_json_atomic(os.path.join(folder, "mean_results.json"),
                      round_floats({"total_mean": total_mean, "split_mean": split_mean, "run": run_info}
                                   | ({"routing": routing} if routing else {})))
    lifelong = _write_lifelong(run, folder) if run.cfg.lifelong else None
    if run.cfg.plot:
        if lifelong:
            plot_metrics(os.path.join(folder, "metrics_vs_edits.png"), [c["edits"] for c in lifelong],
                         [c["mean"] for c in lifelong], "number of edits (lifelong, no restore)", log_x=True)
        else:
            plot_metrics(os.path.join(folder, "metrics_vs_edits.png"), list(range(1, len(chunks) + 1)),
                         [c["mean"] for c in chunks], f"chunk index ({run.cfg.sequential_edit_n} edits each)",
                         log_x=False)
    return EvalOutcome(folder, total_mean, split_mean, run_info, chunks_run, chunks_resumed, lifelong)


def _run_info(run: _Run, chunks: list[dict], chunks_run: int, chunks_resumed: int) -> dict:
    import transformers

    edits = sum(c["n_edits"] for c in chunks)
    edit_time = sum(c["edit_time_s"] for c in chunks)
    score_time = sum(c["score_time_s"] for c in chunks)
    scored = sum(c["n_scored_records"] for c in chunks)
    samples = sum(c["n_scored_samples"] for c in chunks)
    stored = run.progress.read(run.progress.path("run.json"))
    return {"config": run.config, "identity": stored["identity"],
            "device": str(run.vllm.device), "dtype": str(run.vllm.dtype).replace("torch.", ""),
            "chunks": len(chunks), "chunks_run": chunks_run, "chunks_resumed": chunks_resumed,
            "total_edit_n": edits, "total_edit_time_s": edit_time,
            "edits_per_s": edits / edit_time if edit_time > 0 else None,
            "edit_time_per_edit_s": edit_time / edits if edits else None,
            "scoring_time_s": score_time, "scored_records": scored, "scored_samples": samples,
            "records_per_s": scored / score_time if score_time > 0 else None,
            "samples_per_s": samples / score_time if score_time > 0 else None,
            "prepare_time_s": sum(c.get("prepare_time_s", 0.0) for c in chunks),
            "edits_saved": os.path.isdir(run.progress.path("edits")) if run.cfg.lifelong else None,
            "records_not_scored": len(run.records) - sum(len(c) for c in run.chunks),  # the dropped partial chunk
            "second_edits": sum(c.get("n_second_edits", 0) for c in chunks),
            "second_edit_image": ("text-only" if run.editor.edits_text_only else "the record's image (the editor "
                                  "cannot edit text-only requests)") if run.cfg.portability_second_edit else None,
            **peak_memory(run.vllm.device),  # of this call (a resumed run measures only what it ran)
            "finished": time.time(), "torch": torch.__version__, "transformers": transformers.__version__}


def _write_lifelong(run: _Run, folder: str) -> list[dict]:
    total = sum(len(r.requests) for r in run.records)
    entries = [run.progress.read(run.progress.checkpoint_path(n)) for n in lifelong_checkpoints(total)
               if os.path.isfile(run.progress.checkpoint_path(n))]
    doc = {"sample_policy": f"all edited records, or a uniform sample of {run.cfg.lifelong_sample_n} "
                            f"without replacement seeded by (seed={run.cfg.seed}, edits)",
           "checkpoints": entries}
    write_json_atomic(os.path.join(folder, "lifelong.json"), round_floats(doc))
    return entries
