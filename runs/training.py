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
  the last batch of an epoch may be smaller.
* The EMA of the loss starts at the first loss (the paper started it at 1.0).
* A final checkpoint is always written, and one on Ctrl-C; resuming continues at step + 1 in the
  same epoch, in the same run folder, so the TensorBoard curves continue.
* The prefetch thread is a daemon whose exceptions reach the main thread (no silent hang).
* config.yaml records the batch size and the seed.

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
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from editors import default_config_path, editor_class, load_editor
from editors.checkpoint import (CHECKPOINTS_DIR, load_editor_weights, load_trainer_state, read_meta,
                                resolve_checkpoint, restore_optimizer, save_checkpoint)
from editors.vllms import TINY_NAMES, canonical_name, load_vllm
from editors.vllms.paths import resolve_model_path, set_aux_flag_paths
from utils.config import config_to_dict, from_dict, load_config
from utils.data import canonical_dataset_name
from utils.devices import resolve_device
from utils.errors import UserError
from utils.io import seed_everything, write_yaml_atomic

from runs.data import load_split
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
    """Ctrl-C during training: a checkpoint was saved (if any step finished) and writers closed."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

def time_seed() -> int:
    """A seed from the clock (as the paper's `set_random_seeds(None)`)."""
    return int(time.time() * 10000) % 99_999_999


# ---------------------------------------------------------------------------------------------
# Data order: pure functions of (seed, epoch, step)
# ---------------------------------------------------------------------------------------------

def steps_per_epoch(num_records: int, batch_size: int) -> int:
    return math.ceil(num_records / batch_size)


def epoch_order(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """Record indices of epoch `epoch` (1-based), in training order."""
    return np.random.default_rng([seed, epoch]).permutation(num_records)


def batch_indices(seed: int, step: int, num_records: int, batch_size: int) -> tuple[int, np.ndarray]:
    """(epoch, record indices) of global step `step` (1-based); batches never cross epochs."""
    per_epoch = steps_per_epoch(num_records, batch_size)
    epoch, within = divmod(step - 1, per_epoch)
    order = epoch_order(seed, epoch + 1, num_records)
    return epoch + 1, order[within * batch_size:(within + 1) * batch_size]


def total_steps(cfg: TrainRunConfig, num_records: int) -> int:
    """Last global step of a run: epochs x steps per epoch, capped by max_steps."""
    total = steps_per_epoch(num_records, cfg.batch_size) * cfg.epochs
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def epoch_of_step(step: int, num_records: int, batch_size: int) -> int:
    return (step - 1) // steps_per_epoch(num_records, batch_size) + 1


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


@contextlib.contextmanager
def deferred_interrupts():
    """Hold Ctrl-C (SIGINT) until the block ends, so an optimizer update is never half applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except (ValueError, TypeError):  # no signal support here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if received:
            raise KeyboardInterrupt


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
    return _Resume(folder=folder, run_dir=os.path.dirname(parent), state=state, meta=meta)


def _check_resume_fits(cfg: TrainRunConfig, resume: _Resume, num_records: int) -> None:
    """The data must be the checkpoint's, and steps must remain to be run."""
    saved_n = resume.state.get("num_records")
    if saved_n is not None and saved_n != num_records:
        raise UserError(f"the training data now has {num_records} records but checkpoint {resume.folder} was "
                        f"trained on {saved_n}; resuming needs the same data (-dna, -dn, --data_dir)")
    step, total = int(resume.state["step"]), total_steps(cfg, num_records)
    if step >= total:
        raise UserError(f"checkpoint {resume.folder} is at step {step}, and this run ends at step {total} "
                        f"({cfg.epochs} epochs x {steps_per_epoch(num_records, cfg.batch_size)} steps, "
                        f"--max_steps {cfg.max_steps}); raise -eps or --max_steps to train further")


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
    """Runs steps `start..total` of one run; owns the writer, the prefetcher and the progress bar."""

    def __init__(self, cfg: TrainRunConfig, seed: int, editor, records: list, resume: _Resume | None = None):
        self.cfg, self.seed, self.editor, self.records = cfg, seed, editor, records
        self.n = len(records)
        self.per_epoch = steps_per_epoch(self.n, cfg.batch_size)
        self.total = total_steps(cfg, self.n)
        self.optimizer, self.scheduler = editor.make_optimizer()
        self.step, self.epoch, self.ema, self.loss = 0, 1, None, None
        self.saved_step, self.last_checkpoint = 0, None
        self.run_dir = self.ckpt_dir = ""
        self.losses: dict[int, float] = {}
        if resume is not None:
            self._restore(resume)

    def _restore(self, resume: _Resume) -> None:
        load_editor_weights(self.editor, resume.folder)
        restore_optimizer(self.optimizer, self.scheduler, resume.state, resume.folder)
        self.step = int(resume.state["step"])
        self.epoch = int(resume.state.get("epoch") or epoch_of_step(max(self.step, 1), self.n, self.cfg.batch_size))
        self.ema, self.loss = resume.state.get("ema_loss"), resume.state.get("loss")
        self.saved_step, self.last_checkpoint = self.step, resume.folder

    # ---- one step -----------------------------------------------------------------------------
    def make_batch(self, step: int) -> Any:
        _, ids = batch_indices(self.seed, step, self.n, self.cfg.batch_size)
        return self.editor.training_batch([self.records[i] for i in ids], batch_rng(self.seed, step))

    def train_one(self, step: int, batch: Any) -> dict:
        """Forward/backward by the editor, then the optimizer and scheduler step; returns the logs."""
        torch.manual_seed(step_torch_seed(self.seed, step))
        self.optimizer.zero_grad(set_to_none=True)
        logs = self.editor.train_step(batch)
        if not isinstance(logs, dict) or "Loss" not in logs:
            raise TypeError(f"{type(self.editor).__name__}.train_step must return a dict with a 'Loss' entry")
        loss = float(logs["Loss"])
        with deferred_interrupts():
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            alpha = self.cfg.ema_alpha
            self.ema = loss if self.ema is None else alpha * loss + (1 - alpha) * self.ema
            self.step, self.loss = step, loss
            self.epoch = epoch_of_step(step, self.n, self.cfg.batch_size)
            self.losses[step] = loss
        return logs

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self) -> str:
        state = {"step": self.step, "epoch": self.epoch, "ema_loss": self.ema, "loss": self.loss,
                 "seed": self.seed, "batch_size": self.cfg.batch_size, "num_records": self.n,
                 "data_name": self._data_name(), "editor": self.editor.name, "backbone": self.editor.vllm.name}
        self.last_checkpoint = save_checkpoint(self.ckpt_dir, self.editor, self.optimizer, self.scheduler, state)
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

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, run_dir: str) -> TrainResult:
        """Train into `run_dir` (its `checkpoints/` and `logs/`) from the current step to the last."""
        self.run_dir, self.ckpt_dir = run_dir, os.path.join(run_dir, CHECKPOINTS_DIR)
        start = self.step + 1
        writer = SummaryWriter(os.path.join(self.run_dir, "logs"), purge_step=start if start > 1 else None)
        prefetcher = BatchPrefetcher(self.make_batch, range(start, self.total + 1), self.cfg.data_buffer_size)
        bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True)
        self.editor.set_train(True)
        try:
            prefetcher.start()
            self._loop(start, prefetcher, writer, bar)
            if self.saved_step != self.step:
                self.save()
        except KeyboardInterrupt:
            raise self._interrupted() from None
        finally:
            prefetcher.close()
            bar.close()
            writer.close()
            self.editor.set_train(False)
        return TrainResult(self.run_dir, self.last_checkpoint, self.step, dict(self.losses))

    def _loop(self, start: int, prefetcher: BatchPrefetcher, writer, bar) -> None:
        last_log_time, last_log_step = time.perf_counter(), self.step
        for step in range(start, self.total + 1):
            logs = self.train_one(step, prefetcher.get(step))
            bar.update(1)
            bar.set_description(f"epoch {self.epoch}/{self.cfg.epochs}")
            bar.set_postfix(loss=f"{self.loss:.4f}", ema=f"{self.ema:.4f}")
            if step % self.cfg.log_every == 0:
                now = time.perf_counter()
                self.write_logs(writer, logs, (step - last_log_step) / max(now - last_log_time, 1e-9))
                last_log_time, last_log_step = now, step
            if step % self.cfg.save_every == 0:
                self.save()
                writer.flush()

    def _interrupted(self) -> TrainingInterrupted:
        """Save what the finished steps learned and say how to resume."""
        if self.step > self.saved_step:
            self.save()
        if self.last_checkpoint is None:
            return TrainingInterrupted(f"interrupted before the first step finished; nothing was saved "
                                       f"(run folder {self.run_dir})", None)
        return TrainingInterrupted(f"interrupted after step {self.step}; checkpoint {self.last_checkpoint}. "
                                   f"Resume with the same command plus -lkpt {self.last_checkpoint}",
                                   self.last_checkpoint)


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

    Raises UserError for bad settings or files (before any step) and TrainingInterrupted on Ctrl-C.
    """
    say = echo or (lambda message: None)
    cls = _check_names(cfg)
    resume = _load_resume(cfg)
    seed = cfg.seed if cfg.seed is not None else (int(resume.state["seed"]) if resume and "seed" in resume.state
                                                  else time_seed())
    _check_editor_config(cls, cfg, resume)
    _, records = load_split(cfg.data_name, "train", cfg.data_dir, cfg.data_limit)
    if resume is not None:
        _check_resume_fits(cfg, resume, len(records))
    vllm = load_vllm(cfg.model_name, path=cfg.model_path, device=cfg.device)
    seed_everything(seed)
    set_aux_flag_paths(cfg.aux_model_paths)  # where the editor's auxiliary models are (if it has any)
    editor = _build_editor(cls, cfg, vllm, resume)
    trainer = Trainer(cfg, seed, editor, records, resume)
    run_dir = resume.run_dir if resume else make_run_dir(cfg.records_dir, editor.name, vllm.name, cfg.name_prefix)
    write_run_config(run_dir, dataclasses.replace(cfg, seed=seed), config_to_dict(editor.config),
                     {"num_records": len(records), "steps_per_epoch": trainer.per_epoch,
                      "total_steps": trainer.total})
    say(f"run folder: {run_dir}")
    say(f"seed: {seed}; {len(records)} records, {trainer.per_epoch} steps per epoch, steps "
        f"{trainer.step + 1}..{trainer.total}" + (f" (resumed from {resume.folder})" if resume else ""))
    result = trainer.run(run_dir)
    say(f"final checkpoint: {result.final_checkpoint}")
    return result


def train(cfg: TrainRunConfig) -> str:
    """Train an editor as `cfg` says; returns the run folder (see `run_training`)."""
    return run_training(cfg).run_dir


__all__ = ["TrainRunConfig", "TrainResult", "TrainingInterrupted", "train", "run_training",
           "epoch_order", "batch_indices", "total_steps", "batch_rng", "step_torch_seed", "steps_per_epoch",
           "BatchPrefetcher",
           "Trainer", "make_run_dir", "write_run_config", "deferred_interrupts"]
