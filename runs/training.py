"""A generic trainer for any `TrainableEditor` (the paper's `train_init` + `train`, with its bugs fixed).

    run_dir = train(TrainRunConfig(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY",
                                   batch_size=8, max_steps=200))

What it does, in order: check every setting, load the data, the backbone and the editor (all
before the first step), make the run folder

    records/<editor>/<model>/<[prefix-]YYYY.MM.DD-HH.MM.SS>/
        config.yaml      {run: every TrainRunConfig field incl. batch size and the actual seed,
                          editor: the editor's config, data: record count and steps per epoch}
        checkpoints/     step-<N>/ folders (editors/checkpoint.py) and a `latest` pointer
        logs/            TensorBoard event files

then runs steps 1..T, T = epochs x ceil(n / batch_size), or fewer with `max_steps`.

Differences from the paper's loop (spec §5.3-5.4, W-7, W-9, W-10, W-29):
* The data order is a pure function of (seed, epoch) and each step's random generator a pure
  function of (seed, step), so a resumed run continues exactly where the checkpoint was taken
  (same batches, same losses) without saving any RNG stream. A batch never mixes two epochs;
  the last batch of an epoch may be smaller. With `--batch_neighbours K` a batch is anchors from that
  order plus each anchor's K visually nearest records (runs/neighbours.py; keys computed once, cached
  in the run folder), still a pure function of (seed, epoch, step).
* The EMA of the loss starts at the first loss (the paper started it at 1.0).
* A final checkpoint is always written, and one of the last finished step on Ctrl-C, SIGTERM or an
  exception mid-run (a signal during a checkpoint write waits for the write); resuming continues
  at step + 1 in the same epoch, in the same run folder, so the TensorBoard curves continue. The
  last finished step's scalars are written however the run ends.
* A non-finite loss or gradient stops the run before that step's update (the paper trained on).
* Resuming checks the data's fingerprint, not only its record count.
* The prefetch thread is a daemon whose exceptions reach the main thread (no silent hang).
* config.yaml records the batch size and the seed.

Under torchrun (`runs/distributed.py`, docs/DISTRIBUTED.md) every rank runs this same loop on the
same global batches: the editor computes its rank's rows of each batch (`supports_sharded_training`),
the gradients are summed over ranks before the update, and the logged loss is the global one, so N
ranks at -bs B compute the steps of one process at -bs B. Rank 0 alone writes the run folder,
config.yaml, checkpoints and TensorBoard. A Ctrl-C / SIGTERM on any rank is noted; the ranks learn of
it in the all-reduce that sums the gradients (the step's one collective besides the editor's gathers)
and all stop after that step (rank 0 saves).

Editors' contract with this trainer: `training_batch(records, rng)` runs in the prefetch thread
under `torch.no_grad`, concurrently with `train_step` of an earlier batch, and must draw random
numbers from `rng` only (not from torch's global generator); use `data_buffer_size=0` to prepare
batches in the main thread instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from editors import default_config_path, editor_class, load_editor
from editors.checkpoint import (CHECKPOINTS_DIR, checkpoint_name, load_editor_weights, load_trainer_state,
                                read_meta, resolve_checkpoint, restore_optimizer, save_checkpoint)
from editors.vllms import TINY_NAMES, canonical_name, load_vllm
from editors.vllms.paths import resolve_model_path, set_aux_flag_paths
from utils.config import config_to_dict, from_dict, load_config
from utils.data import canonical_dataset_name
from utils.devices import resolve_device
from utils.errors import UserError
from utils.io import seed_everything, write_yaml_atomic
from utils.records import data_fingerprint

from runs import distributed
from runs.data import check_lengths, load_split
from runs.neighbours import (anchors_per_batch, cache_key, cached_visual_keys, compose_batch, neighbour_table,
                             table_width, visual_keys)
from runs.signals import deferred_interrupts, signal_label, signal_of, terminate_like_ctrl_c
from runs.train_config import TrainRunConfig

_BATCH_STREAM = 1_000_003   # rng of step s: default_rng([seed, _BATCH_STREAM, s])
_TORCH_STREAM = 2_000_003   # torch.manual_seed before step s: drawn from default_rng([seed, _TORCH_STREAM, s])


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    run_dir: str
    final_checkpoint: str | None
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss, steps run in this call


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during training: the last finished step was saved (if one finished), writers closed.

    `signum` is the signal (SIGINT or SIGTERM); the CLI exits with 128 + signum (130, 143).
    """

    def __init__(self, message: str, checkpoint: str | None, signum: int = signal.SIGINT):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signum = int(signum)


class TrainingDiverged(UserError):
    """A step's loss or gradients were not finite: that step's update was not applied and training stopped.

    `checkpoint` holds the last step with a finite loss and finite parameters (None when no step
    finished); `step` is the step whose loss or gradients were not finite. The CLI exits with 3.
    """

    def __init__(self, message: str, checkpoint: str | None, step: int):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


class _NonFinite(Exception):
    """Raised inside the loop at the first non-finite loss / gradient; becomes TrainingDiverged."""

    def __init__(self, step: int, what: str):
        super().__init__(what)
        self.step, self.what = step, what


STOP_NOTE = "training stopped by this error"  # start of the note added to an exception raised mid-run


def stop_note(exc: BaseException) -> str | None:
    """The trainer's note on an exception raised mid-run (what was saved, how to resume), if any."""
    return next((n for n in getattr(exc, "__notes__", ()) if n.startswith(STOP_NOTE)), None)


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

def time_seed() -> int:
    """A seed from the clock (as the paper's `set_random_seeds(None)`)."""
    return int(time.time() * 10000) % 99_999_999


# ---------------------------------------------------------------------------------------------
# Data order: pure functions of (seed, epoch, step)
# ---------------------------------------------------------------------------------------------

def steps_per_epoch(num_records: int, batch_size: int, neighbours: int = 0) -> int:
    """Steps of one epoch: every record once (as an anchor when `neighbours` > 0, see runs/neighbours.py)."""
    return math.ceil(num_records / anchors_per_batch(batch_size, neighbours))


def epoch_order(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """Record indices of epoch `epoch` (1-based), in training order."""
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def batch_indices(seed: int, step: int, num_records: int, batch_size: int, neighbours: int = 0,
                  table: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """(epoch, record indices) of global step `step` (1-based); batches never cross epochs.

    neighbours = K > 0 (with `table`, `runs.neighbours.neighbour_table`): the step's slice of the epoch
    order gives ceil(B/(K+1)) anchors, each followed by its K nearest records (`compose_batch`)."""
    per_epoch = steps_per_epoch(num_records, batch_size, neighbours)
    epoch, within = divmod(step - 1, per_epoch)
    order = epoch_order(seed, epoch + 1, num_records)
    if neighbours == 0:
        return epoch + 1, order[within * batch_size:(within + 1) * batch_size]
    if table is None:
        raise ValueError("batch_indices with neighbours > 0 needs the neighbour table")
    anchors = anchors_per_batch(batch_size, neighbours)
    return epoch + 1, compose_batch(order[within * anchors:(within + 1) * anchors], table, neighbours, batch_size)


def total_steps(cfg: TrainRunConfig, num_records: int) -> int:
    """Last global step of a run: epochs x steps per epoch, capped by max_steps."""
    total = steps_per_epoch(num_records, cfg.batch_size, cfg.batch_neighbours) * cfg.epochs
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def epoch_of_step(step: int, num_records: int, batch_size: int, neighbours: int = 0) -> int:
    return (step - 1) // steps_per_epoch(num_records, batch_size, neighbours) + 1


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator handed to `editor.training_batch` for step `step`."""
    return np.random.default_rng([seed, _BATCH_STREAM, step])


def step_torch_seed(seed: int, step: int) -> int:
    """The torch seed set right before `editor.train_step` of step `step`."""
    return int(np.random.default_rng([seed, _TORCH_STREAM, step]).integers(2**62))


# ---------------------------------------------------------------------------------------------
# Prefetching
# ---------------------------------------------------------------------------------------------

class BatchPrefetcher:
    """Prepares the batches of `steps` in order, `buffer_size` ahead, in a daemon thread.

    `get(step)` must be called with the steps in order. An exception in the thread is re-raised
    by `get` (same object, original traceback). `buffer_size == 0` prepares in the caller's thread.
    """

    def __init__(self, make_batch: Callable[[int], Any], steps: range, buffer_size: int):
        self.make_batch = make_batch
        self.steps = steps
        self.buffer_size = buffer_size
        self._queue: queue.Queue = queue.Queue(maxsize=max(buffer_size, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "BatchPrefetcher":
        if self.buffer_size > 0 and len(self.steps) > 0:
            self._thread = threading.Thread(target=self._work, name="batch-prefetch", daemon=True)
            self._thread.start()
        return self

    def _work(self) -> None:
        step = None
        try:
            for step in self.steps:
                if self._stop.is_set():
                    return
                with torch.no_grad():
                    batch = self.make_batch(step)
                if not self._put((step, batch, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, never swallowed
            exc.add_note(f"(raised in the data-preparation thread while preparing the batch of step {step})")
            self._put((step, None, exc))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int) -> Any:
        """The batch of `step`; raises the worker's exception if preparing it (or an earlier one) failed."""
        if self._thread is None:
            with torch.no_grad():
                return self.make_batch(step)
        while True:
            try:
                got_step, batch, exc = self._queue.get(timeout=0.2)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data-preparation thread stopped without a batch or an error")
        if exc is not None:
            raise exc
        if got_step != step:
            raise RuntimeError(f"prefetcher out of order: asked for step {step}, got step {got_step}")
        return batch

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (it finishes at most the batch it is preparing) and drop queued batches."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        if self._thread is not None:
            self._thread.join(timeout)


# ---------------------------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------------------------

def make_run_dir(records_dir: str, editor_name: str, model_name: str, prefix: str | None) -> str:
    """Create `records/<editor>/<model>/<[prefix-]YYYY.MM.DD-HH.MM.SS>[-k]` and its subfolders."""
    stamp = datetime.datetime.now().strftime("%Y.%m.%d-%H.%M.%S")
    base = os.path.join(records_dir, editor_name, model_name, f"{prefix}-{stamp}" if prefix else stamp)
    run_dir, k = base, 1
    while True:
        try:
            os.makedirs(run_dir)
            break
        except FileExistsError:
            k += 1
            run_dir = f"{base}-{k}"
    os.makedirs(os.path.join(run_dir, CHECKPOINTS_DIR))
    os.makedirs(os.path.join(run_dir, "logs"))
    return run_dir


def _plain(value):
    """Tuples -> lists, recursively, so that yaml.safe_dump / safe_load round-trip the config."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_run_config(run_dir: str, run_cfg: TrainRunConfig, editor_config: dict, data_info: dict) -> str:
    """Write config.yaml atomically: {run: run fields, editor: editor config, data: counts}."""
    content = {"run": _plain(dataclasses.asdict(run_cfg)), "editor": _plain(editor_config),
               "data": _plain(data_info)}
    path = os.path.join(run_dir, "config.yaml")
    write_yaml_atomic(path, content)
    return path


# ---------------------------------------------------------------------------------------------
# Setup: everything is checked and loaded before the first step
# ---------------------------------------------------------------------------------------------

@dataclass
class _Resume:
    """A checkpoint to continue from."""

    folder: str
    run_dir: str
    state: dict
    meta: dict


def _check_names(cfg: TrainRunConfig):
    """Editor, dataset, device and backbone names and the weight folder (cheap checks first).

    Returns the editor class."""
    cls = editor_class(cfg.editor_name)
    if not cls.needs_training:
        raise UserError(f"editor {cfg.editor_name!r} needs no training (it edits without learned modules); "
                        f"evaluate it directly with test_vllm_edit.py")
    canonical_dataset_name(cfg.data_name)
    resolve_device(cfg.device)
    full = canonical_name(cfg.model_name)
    if full not in TINY_NAMES:
        resolve_model_path(full, cfg.model_path)  # a missing weight folder fails now, not after the data
    elif cfg.model_path is not None and not os.path.isdir(cfg.model_path):
        raise UserError(f"model folder does not exist: {cfg.model_path} (from --model_path)")
    return cls


def _load_resume(cfg: TrainRunConfig) -> _Resume | None:
    """Read the checkpoint to resume from and check it matches the requested run."""
    if cfg.resume_from is None:
        return None
    folder, _ = resolve_checkpoint(cfg.resume_from)
    state, meta = load_trainer_state(folder), read_meta(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.basename(parent) != CHECKPOINTS_DIR:
        raise UserError(f"cannot resume from {folder}: it is not inside a run's {CHECKPOINTS_DIR}/ folder, so "
                        f"there is no run folder to continue (evaluation can still load it)")
    expected = {
        "editor": (cfg.editor_name.strip().lower(), "-en/--editor_name"),
        "backbone": (canonical_name(cfg.model_name), "-mn/--edit_model_name"),
        "data_name": (canonical_dataset_name(cfg.data_name), "-dna/--data_name"),
        "batch_size": (cfg.batch_size, "-bs/--batch_size"),
    }
    if cfg.seed is not None:
        expected["seed"] = (cfg.seed, "-rs/--random_seed")
    for key, (wanted, flag) in expected.items():
        saved = state.get(key, meta.get(key))
        if saved is not None and saved != wanted:
            hint = " (leave -rs out to reuse the checkpoint's seed)" if key == "seed" else ""
            raise UserError(f"checkpoint {folder} was trained with {key} {saved!r}, but {flag} gives {wanted!r}; "
                            f"resuming needs the same value{hint}")
    saved_k = int(state.get("batch_neighbours") or 0)  # not stored = 0 (uniform batches)
    if saved_k != cfg.batch_neighbours:
        raise UserError(f"checkpoint {folder} was trained with --batch_neighbours {saved_k}, but this run asks for "
                        f"{cfg.batch_neighbours}; resuming needs the same value (it sets the data order)")
    return _Resume(folder=folder, run_dir=os.path.dirname(parent), state=state, meta=meta)


def _check_resume_fits(cfg: TrainRunConfig, resume: _Resume, num_records: int,
                       fingerprint: str | None = None) -> list[str]:
    """The data must be the checkpoint's, and steps must remain to be run; returns notes to print.

    `fingerprint` is `data_fingerprint(records, relative_to=cfg.data_dir)` of the data now; it is
    compared with the one the checkpoint stored (checkpoints written before it was stored have
    none: they resume, with a note).
    """
    notes = []
    saved_n = resume.state.get("num_records")
    if saved_n is not None and saved_n != num_records:
        raise UserError(f"the training data now has {num_records} records but checkpoint {resume.folder} was "
                        f"trained on {saved_n}; resuming needs the same data (-dna, -dn, --data_dir)")
    saved_print = resume.state.get("data_fingerprint")
    if fingerprint is not None and saved_print is not None and saved_print != fingerprint:
        raise UserError(f"the training data now differs from the data checkpoint {resume.folder} was trained on "
                        f"(same {num_records} records, other content: data fingerprint {fingerprint[:12]} != "
                        f"{str(saved_print)[:12]}); resuming needs the same data (-dna {cfg.data_name}, "
                        f"-dn {cfg.data_limit}, --data_dir {cfg.data_dir})")
    if fingerprint is not None and saved_print is None:
        notes.append(f"note: checkpoint {resume.folder} stores no data fingerprint (written by an older version); "
                     f"only the record count ({num_records}) was checked against the data")
    step, total = int(resume.state["step"]), total_steps(cfg, num_records)
    if step >= total:
        raise UserError(f"checkpoint {resume.folder} is at step {step}, and this run ends at step {total} "
                        f"({cfg.epochs} epochs x {steps_per_epoch(num_records, cfg.batch_size)} steps, "
                        f"--max_steps {cfg.max_steps}); raise -eps or --max_steps to train further")
    return notes


def _check_editor_config(cls, cfg: TrainRunConfig, resume: _Resume | None) -> None:
    """Read the editor YAML now (not after loading a large backbone): it must exist and parse."""
    if cfg.config_path is None and resume is not None and resume.meta.get("editor_config") is not None:
        return  # the checkpoint's own config is used
    path = cfg.config_path or default_config_path(cfg.editor_name, canonical_name(cfg.model_name))
    if cfg.config_path is None and not os.path.isfile(path) and cfg.model_path is None:
        raise UserError(f"no config for editor {cfg.editor_name} on backbone {canonical_name(cfg.model_name)}: "
                        f"{path} is missing (pass --config or add that file)")
    if os.path.isfile(path):
        load_config(cls.config_class, path)


def _build_editor(cls, cfg: TrainRunConfig, vllm, resume: _Resume | None):
    """The editor: from --config / the default YAML, or from the checkpoint's config when resuming."""
    saved = resume.meta.get("editor_config") if resume else None
    if saved is not None and cfg.config_path is None:
        return cls(vllm, from_dict(cls.config_class, saved, where=f"{resume.folder}/meta.json editor_config"))
    editor = load_editor(cfg.editor_name, vllm, cfg.config_path)
    if saved is not None and _plain(config_to_dict(editor.config)) != _plain(saved):
        diff = sorted(k for k in set(saved) | set(config_to_dict(editor.config))
                      if _plain(saved.get(k)) != _plain(config_to_dict(editor.config).get(k)))
        raise UserError(f"--config {cfg.config_path} differs from the config the checkpoint was trained with "
                        f"(keys {diff}); drop --config to resume with the checkpoint's config")
    return editor


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------

class Trainer:
    """Runs steps `start..total` of one run; owns the writer, the prefetcher and the progress bar.

    How a run ends (each keeps the last finished step in a finished checkpoint):
    * normally: the final checkpoint;
    * Ctrl-C or SIGTERM: `TrainingInterrupted` (a signal during a checkpoint write waits for the write);
    * a non-finite loss or gradient: that step's update is not applied, `TrainingDiverged`;
    * any other exception (a bad image met mid-run, out of memory): the same exception, with a note
      naming the checkpoint (`stop_note`).
    """

    def __init__(self, cfg: TrainRunConfig, seed: int, editor, records: list, resume: _Resume | None = None,
                 fingerprint: str | None = None, group: distributed.Group | None = None):
        self.cfg, self.seed, self.editor, self.records = cfg, seed, editor, records
        self.group = group or distributed.Group()
        self.n = len(records)
        self.neighbours = cfg.batch_neighbours
        self.per_epoch = steps_per_epoch(self.n, cfg.batch_size, self.neighbours)
        self.table: np.ndarray | None = None  # [n, K + B - 1] nearest records, set by `use_neighbours` when K > 0
        self.total = total_steps(cfg, self.n)
        self.fingerprint = fingerprint or data_fingerprint(records, relative_to=cfg.data_dir)
        self.optimizer, self.scheduler = editor.make_optimizer()
        self._named_parameters = [(f"{name}.{key}", p) for name, module in editor.trainable_modules().items()
                                  for key, p in module.named_parameters()]
        self.step, self.epoch, self.ema, self.loss = 0, 1, None, None
        self.saved_step, self.last_checkpoint = 0, None
        self.run_dir = self.ckpt_dir = ""
        self.losses: dict[int, float] = {}
        self._updating = False                        # inside an optimizer update (state half changed)
        self._last_logs: dict | None = None           # the logs of the last finished step
        self._logged_step = 0                         # last step whose scalars were written
        self._clock = (time.perf_counter(), 0)        # (time, step) of the last scalars written
        self._requested: list[int] = []               # torchrun: signals this rank noted (deferred_interrupts)
        self._agreed_signal = 0                       # torchrun: the signal all ranks agreed on at the last step
        if resume is not None:
            self._restore(resume)
        distributed.broadcast_parameters(self.group, [p for _, p in self._named_parameters])

    def _restore(self, resume: _Resume) -> None:
        load_editor_weights(self.editor, resume.folder)
        restore_optimizer(self.optimizer, self.scheduler, resume.state, resume.folder)
        self.step = int(resume.state["step"])
        self.epoch = int(resume.state.get("epoch") or epoch_of_step(max(self.step, 1), self.n, self.cfg.batch_size,
                                                                     self.neighbours))
        self.ema, self.loss = resume.state.get("ema_loss"), resume.state.get("loss")
        self.saved_step, self.last_checkpoint = self.step, resume.folder
        self._logged_step = self.step

    # ---- one step -----------------------------------------------------------------------------
    def use_neighbours(self, table: np.ndarray) -> None:
        """The neighbour table of the records (`runs.neighbours.neighbour_table`), needed when K > 0."""
        self.table = table

    def make_batch(self, step: int) -> Any:
        _, ids = batch_indices(self.seed, step, self.n, self.cfg.batch_size, self.neighbours, self.table)
        return self.editor.training_batch([self.records[i] for i in ids], batch_rng(self.seed, step))

    def train_one(self, step: int, batch: Any) -> dict:
        """Forward/backward by the editor, then the optimizer and scheduler step; returns the logs.

        A non-finite loss or gradient raises `_NonFinite` before the update: the parameters stay
        those of the last finished step.
        """
        torch.manual_seed(step_torch_seed(self.seed, step))
        self.optimizer.zero_grad(set_to_none=True)
        logs = self.editor.train_step(batch)
        # torchrun: one all-reduce sums the gradients, the logged shares (StepTotals) and the ranks' stop requests
        self._agreed_signal = distributed.sum_gradients(self.group, [p for _, p in self._named_parameters], step,
                                                        logs, self._requested)
        if not isinstance(logs, Mapping) or "Loss" not in logs:
            raise TypeError(f"{type(self.editor).__name__}.train_step must return a dict with a 'Loss' entry")
        loss = float(logs["Loss"])
        if not math.isfinite(loss):
            raise _NonFinite(step, f"the loss is {loss}")
        bad = self._non_finite_gradients()
        if bad:
            raise _NonFinite(step, f"the gradients of {bad} are not finite (the loss is {loss})")
        with deferred_interrupts():
            self._updating = True
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            alpha = self.cfg.ema_alpha
            self.ema = loss if self.ema is None else alpha * loss + (1 - alpha) * self.ema
            self.step, self.loss = step, loss
            self.epoch = epoch_of_step(step, self.n, self.cfg.batch_size, self.neighbours)
            self.losses[step] = loss
            self._last_logs = logs
            self._updating = False
        return logs

    def _non_finite_gradients(self) -> str:
        """Names of the parameters whose gradient holds inf / nan ('' when all are finite; one sync per device)."""
        grads = [(name, p.grad) for name, p in self._named_parameters if p.grad is not None]
        return _non_finite_names(grads)

    def _non_finite_parameters(self) -> str:
        return _non_finite_names([(name, p.detach()) for name, p in self._named_parameters])

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self) -> str:
        """Checkpoint the current step (a signal meanwhile waits until the folder is complete)."""
        bad = self._non_finite_parameters()
        if bad:
            raise _NonFinite(self.step, f"the parameters {bad} are not finite after the update of step {self.step}")
        state = {"step": self.step, "epoch": self.epoch, "ema_loss": self.ema, "loss": self.loss,
                 "seed": self.seed, "batch_size": self.cfg.batch_size, "num_records": self.n,
                 **({"batch_neighbours": self.neighbours} if self.neighbours else {}),
                 "data_fingerprint": self.fingerprint,
                 "data_name": self._data_name(), "editor": self.editor.name, "backbone": self.editor.vllm.name}
        with deferred_interrupts():
            if self.group.is_main:
                self.last_checkpoint = save_checkpoint(self.ckpt_dir, self.editor, self.optimizer, self.scheduler,
                                                       state)
            else:  # rank 0 writes the run's one checkpoint set
                self.last_checkpoint = os.path.join(self.ckpt_dir, checkpoint_name(self.step))
            self.saved_step = self.step
        return self.last_checkpoint

    def _data_name(self) -> str:
        return canonical_dataset_name(self.cfg.data_name)

    # ---- logging ------------------------------------------------------------------------------
    def write_logs(self, writer, logs: dict, steps_per_second: float) -> None:
        scalars = _flatten(logs)
        scalars["EMA Loss"] = self.ema
        scalars["Learning rate"] = self.optimizer.param_groups[0]["lr"]
        for i, group in enumerate(self.optimizer.param_groups[1:], start=1):
            scalars[f"Learning rate-{i}"] = group["lr"]
        scalars["Epoch"] = self.epoch
        scalars["Steps per second"] = steps_per_second
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, self.step)

    def _log_step(self, writer) -> None:
        """Write the scalars of the last finished step (once) and restart the steps-per-second clock."""
        if self._last_logs is None or self._logged_step == self.step:
            return
        now, (then, then_step) = time.perf_counter(), self._clock
        self.write_logs(writer, self._last_logs, (self.step - then_step) / max(now - then, 1e-9))
        self._clock, self._logged_step = (now, self.step), self.step

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, run_dir: str) -> TrainResult:
        """Train into `run_dir` (its `checkpoints/` and `logs/`) from the current step to the last.

        In the main thread, SIGTERM stops the run like Ctrl-C (`TrainingInterrupted`).
        """
        if self.neighbours and self.table is None:
            raise ValueError("batch_neighbours > 0: call Trainer.use_neighbours(table) before run()")
        self.run_dir, self.ckpt_dir = run_dir, os.path.join(run_dir, CHECKPOINTS_DIR)
        start = self.step + 1
        self._clock = (time.perf_counter(), self.step)
        main = self.group.is_main
        writer = (SummaryWriter(os.path.join(self.run_dir, "logs"), purge_step=start if start > 1 else None)
                  if main else _NoWriter())
        prefetcher = BatchPrefetcher(self.make_batch, range(start, self.total + 1), self.cfg.data_buffer_size)
        bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True, disable=not main)
        self.editor.set_train(True)
        # torchrun: a signal only notes a stop request; the ranks agree after each step (see _loop)
        requests = deferred_interrupts(redeliver=False) if self.group.distributed else contextlib.nullcontext([])
        with terminate_like_ctrl_c():
            try:
                with requests as requested:
                    prefetcher.start()
                    self._loop(start, prefetcher, writer, bar, requested)
                    if self.saved_step != self.step:
                        self.save()
                    self._log_step(writer)
            except BaseException as exc:  # noqa: BLE001 - every way out saves the last finished step
                with deferred_interrupts(redeliver=False) as more:
                    prefetcher.close()
                    stop = self._stopped(exc, start, writer, more)
                    if self.group.distributed and isinstance(exc, KeyboardInterrupt):
                        with contextlib.suppress(distributed.PeerFailure):  # the others exit once rank 0 saved
                            distributed.barrier(self.group, "waiting for rank 0's checkpoint")
                if stop is None:
                    raise
                raise stop from None
            finally:
                with deferred_interrupts(redeliver=False):
                    prefetcher.close()
                    bar.close()
                    writer.close()
                    self.editor.set_train(False)
        return TrainResult(self.run_dir, self.last_checkpoint, self.step, dict(self.losses))

    def _loop(self, start: int, prefetcher: BatchPrefetcher, writer, bar, requested: list[int]) -> None:
        self._requested = requested
        for step in range(start, self.total + 1):
            self.train_one(step, prefetcher.get(step))
            bar.update(1)
            bar.set_description(f"epoch {self.epoch}/{self.cfg.epochs}")
            bar.set_postfix(loss=f"{self.loss:.4f}", ema=f"{self.ema:.4f}")
            if step % self.cfg.log_every == 0:
                self._log_step(writer)
            if step % self.cfg.save_every == 0:
                self.save()
                writer.flush()
            # did any rank get Ctrl-C / SIGTERM before this step's gradients were summed? (no extra collective)
            if self.group.distributed and step < self.total and self._agreed_signal:
                raise distributed.interrupt_for(self._agreed_signal)

    # ---- stopping early -----------------------------------------------------------------------
    def _stopped(self, exc: BaseException, start: int, writer, more: list[int]) -> BaseException | None:
        """Save the last finished step after `exc` stopped the loop; returns the exception to raise.

        None means: re-raise `exc` itself (it got a note naming the checkpoint). Signals received
        meanwhile (`more`) are held until the checkpoint is complete and then only reported.
        """
        if isinstance(exc, KeyboardInterrupt):
            return self._interrupted(exc, start, writer, more)
        if isinstance(exc, _NonFinite):
            return self._diverged(exc, writer)
        if self._updating:
            exc.add_note(f"{STOP_NOTE} during the optimizer update of step {self.step + 1}: the parameters may be "
                         f"half updated, so nothing new was saved; " + self._resume_hint())
            return None
        saved = self._save_after_failure(writer)
        exc.add_note(f"{STOP_NOTE} after step {self.step} (the last finished step); " + saved)
        return None

    def _save_after_failure(self, writer) -> str:
        """Save the last finished step after an error; returns what was saved, in words."""
        with contextlib.suppress(Exception):
            self._log_step(writer)
            writer.flush()
        self.optimizer.zero_grad(set_to_none=True)  # frees the gradients (e.g. after out of memory)
        if self.step > self.saved_step:
            try:
                self.save()
            except _NonFinite as bad:
                return f"step {self.step} was not saved: {bad.what}; " + self._resume_hint()
            except Exception as save_exc:  # noqa: BLE001 - reported, the original error still wins
                return (f"saving step {self.step} failed too ({type(save_exc).__name__}: {save_exc}); "
                        + self._resume_hint())
        return self._resume_hint()

    def _resume_hint(self) -> str:
        if self.last_checkpoint is None:
            return f"no step had finished, nothing was saved (run folder {self.run_dir})"
        return (f"checkpoint {self.last_checkpoint} holds step {self.saved_step}. Resume with the same command "
                f"plus -lkpt {self.last_checkpoint}")

    def _interrupted(self, exc: BaseException, start: int, writer, more: list[int]) -> TrainingInterrupted:
        """Ctrl-C / SIGTERM: save what the finished steps learned and say how to resume."""
        signum = signal_of(exc)
        what = f"interrupted ({signal_label(signum)})"
        saved = self._save_after_failure(writer)
        held = (f" ({' and '.join(signal_label(s) for s in dict.fromkeys(more))} received while the checkpoint "
                f"was written: the write finished first)") if more else ""
        if self.step < start:
            if self.last_checkpoint is None:
                return TrainingInterrupted(f"{what} before the first step finished; nothing was saved "
                                           f"(run folder {self.run_dir})", None, signum)
            return TrainingInterrupted(f"{what} before step {start} finished; nothing new to save; {saved}",
                                       self.last_checkpoint, signum)
        return TrainingInterrupted(f"{what} after step {self.step}; {saved}{held}", self.last_checkpoint, signum)

    def _diverged(self, exc: _NonFinite, writer) -> TrainingDiverged:
        """A non-finite loss / gradient / parameter: keep the last finite step and stop."""
        with contextlib.suppress(Exception):
            self._log_step(writer)
            writer.flush()
        self.optimizer.zero_grad(set_to_none=True)
        if exc.step == self.step:  # found at save time: this step's update made the parameters non-finite
            what = f"training diverged: {exc.what}"
            kept = (f"the last finite checkpoint is {self.last_checkpoint} (step {self.saved_step})"
                    if self.last_checkpoint else "nothing was saved")
        else:
            what = f"training diverged at step {exc.step}: {exc.what}; that step's update was not applied"
            if self.step > self.saved_step:
                try:
                    self.save()
                except _NonFinite as later:
                    what += f", and {later.what}"
            kept = (f"checkpoint {self.last_checkpoint} holds step {self.saved_step}, the last step with a "
                    f"finite loss and finite parameters" if self.last_checkpoint else
                    "no step finished with a finite loss, nothing was saved")
        return TrainingDiverged(f"{what}; {kept}. Lower the learning rate (lr in the editor config, --config) "
                                f"and train again", self.last_checkpoint, exc.step)


class _NoWriter:
    """The TensorBoard writer of ranks other than 0 (rank 0 alone writes the run's logs)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _non_finite_names(named: list[tuple[str, torch.Tensor]], shown: int = 5) -> str:
    """'a, b (and 3 more)' for the tensors holding inf / nan; '' when all are finite (one sync per device)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, tensor in named:
        by_device.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return ""
    bad = [name for name, tensor in named if not bool(torch.isfinite(tensor).all())]
    return ", ".join(bad[:shown]) + (f" (and {len(bad) - shown} more)" if len(bad) > shown else "")


def _flatten(logs: dict) -> dict[str, float]:
    """Editor logs -> {tag: float}; a nested {k: {n: v}} becomes tag `k-n` (as the paper's write_logs)."""
    flat = {}
    for key, value in logs.items():
        if isinstance(value, dict):
            flat.update({f"{key}-{k}": v for k, v in _flatten(value).items()})
        else:
            flat[key] = float(value)
    return flat


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def run_training(cfg: TrainRunConfig, echo: Callable[[str], None] | None = print) -> TrainResult:
    """Check, load, train; returns the run folder, the final checkpoint and this call's losses.

    Raises UserError for bad settings or files (before any step), TrainingInterrupted on Ctrl-C or
    SIGTERM, TrainingDiverged at a non-finite loss or gradient; any other exception raised mid-run
    comes with a note naming the checkpoint of the last finished step (`stop_note`).
    """
    cls = _check_names(cfg)
    _check_sharding(cls, cfg, distributed.launched_world_size())  # before waiting for the other ranks
    distributed.check_device_map(cfg.device_map)
    group, device = distributed.setup(cfg.device, cfg.dist_timeout)
    try:
        return _run_training(cfg, echo if group.is_main else None, group, device)
    finally:
        distributed.shutdown(group)


def _check_sharding(cls, cfg: TrainRunConfig, world: int) -> None:
    """Under torchrun: the editor must compute per-rank rows, and -bs must split evenly over the ranks."""
    if world <= 1:
        return
    if not cls.supports_sharded_training:
        raise UserError(f"editor {cfg.editor_name} cannot train under torchrun with {world} processes (it "
                        f"does not split a batch over ranks); run it in one process (python train_vllm_editor.py)")
    if cfg.batch_size % world:
        raise UserError(f"-bs/--batch_size {cfg.batch_size} is the global batch, split over the {world} "
                        f"torchrun processes: it must be divisible by {world}")


def _run_training(cfg: TrainRunConfig, echo, group: distributed.Group, device: str) -> TrainResult:
    """`run_training` once this process has joined its torchrun group (if any)."""
    say = echo or (lambda message: None)
    cls = _check_names(cfg)
    _check_sharding(cls, cfg, group.world)
    resume = _load_resume(cfg)
    seed = cfg.seed if cfg.seed is not None else (int(resume.state["seed"]) if resume and "seed" in resume.state
                                                  else time_seed())
    seed = distributed.broadcast(group, seed, "agreeing on the seed")  # a clock seed differs per rank
    _check_editor_config(cls, cfg, resume)
    _, records = load_split(cfg.data_name, "train", cfg.data_dir, cfg.data_limit)
    fingerprint = data_fingerprint(records, relative_to=cfg.data_dir)
    if resume is not None:
        for note in _check_resume_fits(cfg, resume, len(records), fingerprint):
            say(note)
    vllm = load_vllm(cfg.model_name, path=cfg.model_path, device=device, dtype=cfg.dtype,
                     device_map=cfg.device_map)
    check_lengths(vllm, records)
    seed_everything(seed)
    set_aux_flag_paths(cfg.aux_model_paths)  # where the editor's auxiliary models are (if it has any)
    editor = _build_editor(cls, cfg, vllm, resume)
    run_dir = resume.run_dir if resume else distributed.on_main(
        group, lambda: make_run_dir(cfg.records_dir, editor.name, vllm.name, cfg.name_prefix), "creating the run folder")
    editor.prepare_training(records, run_dir, fingerprint, echo)  # before Trainer loads a checkpoint's weights
    trainer = Trainer(cfg, seed, editor, records, resume, fingerprint, group)
    data_info = {"num_records": len(records), "steps_per_epoch": trainer.per_epoch, "total_steps": trainer.total}
    if group.distributed:
        data_info["world_size"] = group.world
    if cfg.batch_neighbours:
        data_info["visual_keys"] = _attach_neighbours(trainer, cfg, vllm, records, fingerprint, run_dir, group, say)
    if group.is_main:
        write_run_config(run_dir, dataclasses.replace(cfg, seed=seed, dtype=str(vllm.dtype).replace("torch.", "")),
                         config_to_dict(editor.config), data_info)
    say(f"run folder: {run_dir}")
    say(f"seed: {seed}; {len(records)} records, {trainer.per_epoch} steps per epoch, steps "
        f"{trainer.step + 1}..{trainer.total}" + (f" (resumed from {resume.folder})" if resume else ""))
    result = trainer.run(run_dir)
    say(f"final checkpoint: {result.final_checkpoint}")
    return result


def _attach_neighbours(trainer: "Trainer", cfg: TrainRunConfig, vllm, records: list, fingerprint: str,
                       run_dir: str, group: distributed.Group, say) -> str:
    """--batch_neighbours K: the records' visual keys (cached in the run folder) -> the trainer's neighbour
    table, made once on rank 0 and sent to the others (every rank draws the same batches). Returns the
    cache file's path relative to the run folder."""
    def build():
        key = cache_key(vllm.name, cfg.model_path, str(vllm.dtype).replace("torch.", ""), fingerprint)
        started = time.perf_counter()
        keys, path, reused = cached_visual_keys(run_dir, key, lambda: visual_keys(vllm, records),
                                                 len(records))  # [n, D]
        table = neighbour_table(keys, table_width(cfg.batch_size, cfg.batch_neighbours))  # [n, K + B - 1]
        say(f"batch neighbours: K={cfg.batch_neighbours}, visual keys {'read from' if reused else 'computed into'} "
            f"{path} ({time.perf_counter() - started:.1f} s)")
        return table, os.path.relpath(path, run_dir)

    table, where = distributed.on_main(group, build, "computing the records' visual keys (--batch_neighbours)")
    trainer.use_neighbours(table)
    return where


def train(cfg: TrainRunConfig) -> str:
    """Train an editor as `cfg` says; returns the run folder (see `run_training`)."""
    return run_training(cfg).run_dir


__all__ = ["TrainRunConfig", "TrainResult", "TrainingInterrupted", "TrainingDiverged", "stop_note", "train", "run_training",
           "epoch_order", "batch_indices", "total_steps", "batch_rng", "step_torch_seed", "steps_per_epoch",
           "BatchPrefetcher",
           "Trainer", "make_run_dir", "write_run_config", "deferred_interrupts"]
