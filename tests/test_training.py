"""The generic trainer (runs/training.py) and checkpoints (editors/checkpoint.py).

A small real trainable editor, `BiasEditor`, adds a learned vector to the output of one decoder
layer of a tiny backbone and a learned bias to its logits; it trains on the toy world like any
editor would. One main run is shared by most tests (module fixture); the others are short.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import editors
from editors.base import Editor, TrainableEditor
from editors.checkpoint import (EDITOR_FILE, META_FILE, TRAINER_FILE, find_latest, load_editor_weights,
                                load_trainer_state)
from utils.errors import UserError
from runs.training import (TrainingInterrupted, TrainRunConfig, batch_indices, epoch_order, run_training,
                            steps_per_epoch, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDITOR_KEY = "bias_test"
MAIN_STEPS = 22     # 16 records, batch 3 -> 6 steps per epoch (last batch 1 record); ends inside epoch 4
SAVE_EVERY = 5      # checkpoints at 5, 10, 15, 20 and the final one at 22


# ---------------------------------------------------------------------------------------------
# A small trainable editor
# ---------------------------------------------------------------------------------------------

@dataclass
class BiasConfig:
    """Config of the test editor."""

    layer: int = 1               # decoder layer whose output gets the learned vector
    rank: int = 1                # number of vectors (summed); changes the checkpoint shapes
    lr: float = 0.2
    lr_step: int = 10            # StepLR period (halves the lr)
    dropout: float = 0.1         # uses torch's RNG in train_step (exercises the per-step torch seed)
    fail_batch_at: int = 0       # training_batch raises ValueError on this call (1-based); 0 = never
    interrupt_at_step: int = 0   # train_step raises KeyboardInterrupt on this call (1-based); 0 = never


class Shift(nn.Module):
    """`rank` learned vectors of the LM width, and a learned bias of the logits."""

    def __init__(self, rank: int, width: int, vocab: int):
        super().__init__()
        self.vectors = nn.Parameter(torch.randn(rank, width) * 0.01)  # [r, d]
        self.logit_bias = nn.Parameter(torch.zeros(vocab))  # [V]


class BiasEditor(TrainableEditor):
    """Adds sum(vectors) to every position of layer `layer`'s output, and a bias to the logits (hooks)."""

    name = EDITOR_KEY
    config_class = BiasConfig

    def __init__(self, vllm, config: BiasConfig):
        super().__init__(vllm, config)
        self.shift = Shift(config.rank, vllm.hidden_size, vllm.stack.lm_head.out_features).to(vllm.device)
        self.batches_made = self.steps_run = 0
        vllm.layers[config.layer].register_forward_hook(self._hook)
        vllm.stack.lm_head.register_forward_hook(lambda module, args, logits: logits + self.shift.logit_bias)

    def _hook(self, module, args, output):
        delta = nn.functional.dropout(self.shift.vectors.sum(0), self.config.dropout, self.shift.training)  # [d]
        if isinstance(output, tuple):
            return (output[0] + delta,) + tuple(output[1:])
        return output + delta

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"shift": self.shift}

    def make_optimizer(self):
        optimizer = torch.optim.Adam(self.shift.parameters(), lr=self.config.lr)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, self.config.lr_step, gamma=0.5)

    def training_batch(self, records, rng: np.random.Generator):
        self.batches_made += 1
        if self.batches_made == self.config.fail_batch_at:
            raise ValueError("boom: bad record in training_batch")
        # the rng picks the request or its text rephrase: a resumed run must pick the same
        samples = [r.requests[0] if rng.random() < 0.5 else r.generality["text_rephrase"][0] for r in records]
        return self.vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])

    def train_step(self, batch) -> dict[str, float]:
        self.steps_run += 1
        if self.steps_run == self.config.interrupt_at_step:
            raise KeyboardInterrupt
        logp = self.vllm(batch).log_softmax(-1)  # [b, l, V]
        nll = -logp.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)[batch.label_mask].mean()
        nll.backward()
        return {"Loss": nll.item(), "Vector norm": self.shift.vectors.norm().item()}


class PlainEditor(Editor):
    """An editor with nothing to train."""

    name = "plain_test"


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def registered():
    """Make the test editors loadable by name, as the CLI would load them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(editors.EDITORS, EDITOR_KEY, f"{__name__}:BiasEditor")
        mp.setitem(editors.EDITORS, "plain_test", f"{__name__}:PlainEditor")
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A small toy world under data/toyworld and an editor config file."""
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("training")
    generate_toyworld(root / "data" / "toyworld", n_train=16, n_eval=8, n_pretrain_scenes=4)
    return root


def write_config(root, name: str = "bias.yaml", **overrides) -> str:
    path = os.path.join(root, name)
    with open(path, "w") as f:
        yaml.safe_dump({"layer": 1, "rank": 1, **overrides}, f)
    return path


def run_config(root, **overrides) -> TrainRunConfig:
    settings = dict(editor_name=EDITOR_KEY, model_name="tiny-blip2", data_name="TOY", batch_size=3,
                    epochs=4, max_steps=MAIN_STEPS, save_every=SAVE_EVERY, log_every=1, seed=123,
                    data_buffer_size=2, records_dir=os.path.join(root, "records"),
                    data_dir=os.path.join(root, "data"))
    settings.update(overrides)
    if "config_path" not in overrides:
        settings["config_path"] = write_config(root)
    return TrainRunConfig(**settings)


@pytest.fixture(scope="module")
def main_run(workspace):
    return run_training(run_config(workspace), echo=None)


def fresh_editor(rank: int = 1) -> BiasEditor:
    from editors.vllms import build_tiny

    return BiasEditor(build_tiny("tiny-blip2"), BiasConfig(rank=rank))


def losses_close(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"


# ---------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------

def test_batches_cover_each_epoch_without_mixing():
    n, bs, seed = 10, 4, 7
    per_epoch = steps_per_epoch(n, bs)
    assert per_epoch == 3
    epochs = [batch_indices(seed, s, n, bs) for s in range(1, 2 * per_epoch + 1)]
    assert [e for e, _ in epochs] == [1, 1, 1, 2, 2, 2]
    assert [len(ids) for _, ids in epochs] == [4, 4, 2, 4, 4, 2]
    first = np.concatenate([ids for e, ids in epochs if e == 1])
    assert sorted(first) == list(range(n))
    assert np.array_equal(first, epoch_order(seed, 1, n))
    assert not np.array_equal(epoch_order(seed, 1, n), epoch_order(seed, 2, n))
    assert np.array_equal(batch_indices(seed, 5, n, bs)[1], epochs[4][1])  # pure function of the step


# ---------------------------------------------------------------------------------------------
# The main run
# ---------------------------------------------------------------------------------------------

def test_losses_fall(main_run):
    losses = [main_run.losses[s] for s in range(1, MAIN_STEPS + 1)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 1.5, losses


def test_run_folder_and_config(main_run, workspace):
    run_dir = main_run.run_dir
    assert os.path.dirname(run_dir) == os.path.join(workspace, "records", EDITOR_KEY, "tiny-blip2")
    with open(os.path.join(run_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["run"]["batch_size"] == 3 and config["run"]["seed"] == 123
    assert config["run"]["max_steps"] == MAIN_STEPS
    assert config["editor"]["rank"] == 1 and config["editor"]["lr"] == 0.2
    assert config["data"] == {"num_records": 16, "steps_per_epoch": 6, "total_steps": MAIN_STEPS}


def test_tensorboard_scalars(main_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(main_run.run_dir, "logs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"Loss", "Vector norm", "EMA Loss", "Learning rate", "Epoch", "Steps per second"} <= tags
    loss = {e.step: e.value for e in events.Scalars("Loss")}
    assert sorted(loss) == list(range(1, MAIN_STEPS + 1))
    assert all(loss[s] == pytest.approx(main_run.losses[s], rel=1e-6) for s in loss)
    ema = events.Scalars("EMA Loss")
    assert ema[0].value == pytest.approx(main_run.losses[1], rel=1e-6)  # EMA starts at the first loss
    lr = {e.step: e.value for e in events.Scalars("Learning rate")}
    assert lr[9] == pytest.approx(0.2) and lr[10] == pytest.approx(0.1)  # read after the scheduler step
    assert {e.step: e.value for e in events.Scalars("Epoch")}[7] == 2


def test_checkpoint_folders(main_run):
    ckpt_dir = os.path.join(main_run.run_dir, "checkpoints")
    names = sorted(os.listdir(ckpt_dir))
    assert names == ["latest", "step-10", "step-15", "step-20", "step-22", "step-5"]  # no temp folders left
    final = os.path.join(ckpt_dir, "step-22")  # 22 % 5 != 0: the final checkpoint still exists
    assert main_run.final_checkpoint == final and find_latest(main_run.run_dir) == final
    assert sorted(os.listdir(final)) == sorted([EDITOR_FILE, TRAINER_FILE, META_FILE])
    with open(os.path.join(final, META_FILE)) as f:
        meta = json.load(f)
    assert meta["editor"] == EDITOR_KEY and meta["backbone"] == "tiny-blip2"
    assert meta["step"] == MAIN_STEPS and meta["epoch"] == 4 and meta["loss"] == main_run.losses[MAIN_STEPS]
    state = torch.load(os.path.join(final, TRAINER_FILE), weights_only=True)
    assert state["step"] == MAIN_STEPS and state["seed"] == 123 and state["scheduler"]["last_epoch"] == MAIN_STEPS
    assert "state" in state["optimizer"] and state["ema_loss"] == pytest.approx(meta["ema_loss"])
    editor = fresh_editor()
    load_editor_weights(editor, main_run.run_dir)  # a run folder means its latest checkpoint
    assert editor.shift.vectors.abs().sum() > 0.05


def test_resume_reproduces_the_uninterrupted_losses(main_run, workspace, tmp_path):
    copy = str(tmp_path / "run")
    shutil.copytree(main_run.run_dir, copy)
    cfg = run_config(workspace, seed=None, max_steps=10, config_path=None,
                     resume_from=os.path.join(copy, "checkpoints", "step-5"))
    resumed = run_training(cfg, echo=None)
    assert resumed.run_dir == copy  # same run folder: the curves continue
    assert sorted(resumed.losses) == list(range(6, 11))
    losses_close(resumed.losses, main_run.losses, range(6, 11))
    assert resumed.final_checkpoint == os.path.join(copy, "checkpoints", "step-10")
    assert load_trainer_state(resumed.final_checkpoint)["step"] == 10
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(copy, "logs"))
    events.Reload()  # the old curve's steps 6..22 are purged: one value per step, the resumed ones
    loss = [(e.step, e.value) for e in events.Scalars("Loss")]
    assert [step for step, _ in loss] == list(range(1, 11))


def test_resume_rejects_another_batch_size(main_run, workspace):
    cfg = run_config(workspace, batch_size=4, resume_from=main_run.run_dir)
    with pytest.raises(UserError, match="batch_size"):
        run_training(cfg, echo=None)


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------

def test_ctrl_c_saves_a_checkpoint_and_resumes(main_run, workspace, tmp_path):
    config = write_config(tmp_path, interrupt_at_step=7)
    cfg = run_config(workspace, records_dir=str(tmp_path / "records"), config_path=config, save_every=100)
    with pytest.raises(TrainingInterrupted, match="-lkpt") as info:
        run_training(cfg, echo=None)
    assert os.path.basename(info.value.checkpoint) == "step-6"
    assert load_trainer_state(info.value.checkpoint)["step"] == 6
    # the checkpoint's own config is used; the editor's call counter restarts, so step 7 runs now
    resumed = run_training(run_config(workspace, config_path=None, max_steps=8, resume_from=info.value.checkpoint),
                           echo=None)
    losses_close(resumed.losses, main_run.losses, [7, 8])


def test_worker_exception_reaches_the_main_thread(workspace, tmp_path):
    cfg = run_config(workspace, records_dir=str(tmp_path / "records"),
                     config_path=write_config(tmp_path, fail_batch_at=3))
    outcome = {}

    def target():
        try:
            run_training(cfg, echo=None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            outcome["exc"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "training hung after the data thread failed"
    exc = outcome.get("exc")
    assert isinstance(exc, ValueError) and "boom" in str(exc)
    assert "training_batch" in "".join(traceback.format_exception(exc))  # the worker's traceback is kept
    assert not [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def test_corrupt_and_unfinished_checkpoints(main_run, tmp_path):
    bad = tmp_path / "step-5"
    shutil.copytree(os.path.join(main_run.run_dir, "checkpoints", "step-5"), bad)
    data = (bad / EDITOR_FILE).read_bytes()
    (bad / EDITOR_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_editor_weights(fresh_editor(), str(bad))
    (bad / META_FILE).unlink()  # what an interrupted write would look like
    with pytest.raises(UserError, match="not a finished checkpoint"):
        find_latest(str(bad))
    with pytest.raises(UserError, match="does not exist"):
        load_editor_weights(fresh_editor(), str(tmp_path / "nowhere"))
    (tmp_path / "empty_run" / "checkpoints" / ".step-3.tmp-abc").mkdir(parents=True)
    with pytest.raises(UserError, match="no finished checkpoint"):
        find_latest(str(tmp_path / "empty_run"))


def test_checkpoint_for_another_shape(main_run):
    with pytest.raises(UserError) as info:
        load_editor_weights(fresh_editor(rank=2), main_run.final_checkpoint)
    message = str(info.value)
    assert "shift.vectors has shape [1, 64]" in message and "expects [2, 64]" in message
    assert "trained for tiny-blip2" in message


def test_editor_without_training_is_refused(workspace):
    with pytest.raises(UserError, match="needs no training"):
        run_training(run_config(workspace, editor_name="plain_test"), echo=None)


def test_bad_settings_name_the_flag(workspace):
    with pytest.raises(UserError, match="-bs/--batch_size"):
        train(run_config(workspace, batch_size=0))


def test_cli_unknown_editor_lists_the_valid_names():
    proc = subprocess.run([sys.executable, "train_vllm_editor.py", "-en", "nosuch", "-mn", "tiny-blip2",
                           "-dna", "TOY", "-bs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: unknown editor 'nosuch'" in proc.stderr and "liveedit" in proc.stderr
    assert "Traceback" not in proc.stderr
