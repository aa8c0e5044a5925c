"""How a training run ends when it does not end normally: SIGTERM, a second Ctrl-C, an error mid-run,
a diverging loss; the interrupted step's TensorBoard scalars; resuming onto other data.

Each way out must keep the last finished step in a finished checkpoint and say how to resume.
Signals are real (sent with os.kill); the SIGTERM test runs the real CLI in a subprocess.
`StopEditor` is a small real trainable editor that can send itself signals or fail at a chosen step.
"""
from __future__ import annotations

import json
import os
import zlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import editors
import train_vllm_editor
from conftest import ROOT
from editors.base import TrainableEditor
from editors.checkpoint import TRAINER_FILE, is_finished, list_checkpoints, load_trainer_state
from runs.training import TrainingDiverged, TrainingInterrupted, TrainRunConfig, batch_indices, run_training
from toyworld.world import generate_toyworld
from utils.errors import UserError

EDITOR_KEY = "stop_test"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------
# A small trainable editor that can stop a run in each way
# ---------------------------------------------------------------------------------------------

@dataclass
class StopConfig:
    """Config of the test editor; every *_at_step counts train_step calls (1-based, 0 = never)."""

    lr: float = 0.1
    signal_at_step: int = 0        # train_step sends this process SIGINT (a real Ctrl-C)
    signal_during_save: bool = False  # ... and a second SIGINT while the next checkpoint is written
    fail_at_step: int = 0          # train_step raises: RuntimeError, or UserError with fail_user
    fail_user: bool = False
    inf_grad_at_step: int = 0      # train_step leaves an inf gradient behind a finite loss


class Shift(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(width))  # [d]


class StopEditor(TrainableEditor):
    """Adds a learned vector to the output of decoder layer 1 (a hook); trains it by teacher forcing."""

    name = EDITOR_KEY
    config_class = StopConfig

    def __init__(self, vllm, config: StopConfig):
        super().__init__(vllm, config)
        self.shift = Shift(vllm.hidden_size).to(vllm.device)
        self.steps_run, self.signal_on_save = 0, False
        vllm.layers[1].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if isinstance(output, tuple):
            return (output[0] + self.shift.vector,) + tuple(output[1:])
        return output + self.shift.vector

    def trainable_modules(self) -> dict[str, nn.Module]:
        if self.signal_on_save:  # called by save_checkpoint: a second Ctrl-C arrives during the write
            self.signal_on_save = False
            os.kill(os.getpid(), signal.SIGINT)
        return {"shift": self.shift}

    def make_optimizer(self):
        return torch.optim.SGD(self.shift.parameters(), lr=self.config.lr), None

    def training_batch(self, records, rng: np.random.Generator):
        samples = [r.requests[0] for r in records]
        return self.vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])

    def train_step(self, batch) -> dict[str, float]:
        self.steps_run += 1
        cfg = self.config
        if self.steps_run == cfg.signal_at_step:
            self.signal_on_save = cfg.signal_during_save
            os.kill(os.getpid(), signal.SIGINT)
        if self.steps_run == cfg.fail_at_step:
            raise (UserError if cfg.fail_user else RuntimeError)(f"boom in step {self.steps_run}")
        logp = self.vllm(batch).log_softmax(-1)  # [b, l, V]
        nll = -logp.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)[batch.label_mask].mean()
        nll.backward()
        if self.steps_run == cfg.inf_grad_at_step:
            self.shift.vector.grad[0] = float("inf")
        return {"Loss": nll.item()}


@pytest.fixture(scope="module", autouse=True)
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt here, however pytest was started.

    A shell without job control starts a background command (`make test &`, `nohup`) with SIGINT
    ignored, and Python then keeps it ignored: the os.kill(SIGINT) of these tests would do nothing
    and the runs would finish normally. The training code rightly keeps an inherited SIG_IGN (a
    background run is not meant to stop on the terminal's Ctrl-C), so the tests set the handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module", autouse=True)
def registered():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(editors.EDITORS, EDITOR_KEY, f"{__name__}:StopEditor")
        yield


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """`<root>/toyworld`: 12 training records (3 steps per epoch at batch 4)."""
    root = tmp_path_factory.mktemp("robust")
    generate_toyworld(str(root / "toyworld"), n_train=12, n_eval=4, n_pretrain_scenes=2)
    return str(root)


def write_config(folder, **settings) -> str:
    path = os.path.join(folder, "stop.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(settings, f)
    return path


def cli_args(data_root, records, *extra) -> list[str]:
    return ["-en", EDITOR_KEY, "-mn", "tiny-blip2", "-dna", "TOY", "--data_dir", data_root, "-bs", "4",
            "-rs", "5", "-sci", "100", "-dbs", "2", "--records_dir", str(records), *extra]


def run_config(data_root, records, **overrides) -> TrainRunConfig:
    settings = dict(editor_name=EDITOR_KEY, model_name="tiny-blip2", data_name="TOY", batch_size=4, seed=5,
                    save_every=100, data_buffer_size=2, max_steps=6, records_dir=str(records), data_dir=data_root)
    settings.update(overrides)
    return TrainRunConfig(**settings)


def only_run(records) -> str:
    (editor,) = os.listdir(records)
    (model,) = os.listdir(os.path.join(records, editor))
    (run,) = os.listdir(os.path.join(records, editor, model))
    return os.path.join(records, editor, model, run)


def saved_steps(run_dir) -> list[int]:
    """Steps of the finished checkpoints; no temporary (hidden) folder may be left behind."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(".")], os.listdir(ckpt_dir)
    return [step for step, _ in list_checkpoints(ckpt_dir)]


def scalars(run_dir, tag: str = "Loss") -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "logs"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


# ---------------------------------------------------------------------------------------------
# 10. SIGTERM (kill, timeout, SLURM, docker stop) saves like Ctrl-C
# ---------------------------------------------------------------------------------------------

def test_sigterm_saves_the_last_finished_step_and_exits_143(data_root, tmp_path):
    records = tmp_path / "records"
    cmd = [sys.executable, os.path.join(ROOT, "train_vllm_editor.py"), "-en", "liveedit", "-mn", "tiny-blip2",
           "-dna", "TOY", "--data_dir", data_root, "-bs", "4", "-rs", "3", "--max_steps", "100000",
           "-sci", "100000", "-lpi", "1000", "--records_dir", str(records)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    start = time.time()
    while max(map(int, re.findall(r"(\d+)/\d+ \[", "".join(stderr))), default=0) < 3:  # tqdm's "k/total ["
        assert proc.poll() is None, "".join(stderr)
        if time.time() - start > 240:
            proc.kill()
            pytest.fail("training did not reach step 3: " + "".join(stderr)[-2000:])
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    reader.join(timeout=10)
    err = "".join(stderr)
    assert "Traceback" not in err
    run_dir = only_run(records)
    (last,) = saved_steps(run_dir)  # no periodic checkpoint (-sci 100000): this one is from the SIGTERM
    assert last >= 3
    checkpoint = os.path.join(run_dir, "checkpoints", f"step-{last}")
    assert f"interrupted (SIGTERM) after step {last}; checkpoint {checkpoint} holds step {last}" in err
    assert f"-lkpt {checkpoint}" in err
    assert load_trainer_state(checkpoint)["step"] == last
    assert max(scalars(run_dir)) == last  # -lpi 1000: only the stop wrote the last step's scalars
    resumed = run_training(TrainRunConfig(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY",
                                          batch_size=4, max_steps=last + 1, data_dir=data_root,
                                          resume_from=checkpoint), echo=None)
    assert sorted(resumed.losses) == [last + 1]


# ---------------------------------------------------------------------------------------------
# 11. A second Ctrl-C while the checkpoint is written
# ---------------------------------------------------------------------------------------------

def test_a_second_ctrl_c_during_the_checkpoint_write_waits_for_it(data_root, tmp_path, capsys):
    config = write_config(tmp_path, signal_at_step=4, signal_during_save=True)
    code = train_vllm_editor.main(cli_args(data_root, tmp_path / "records", "--max_steps", "6",
                                           "--config", config))
    err = capsys.readouterr().err
    assert code == 130
    run_dir = only_run(tmp_path / "records")
    checkpoint = os.path.join(run_dir, "checkpoints", "step-3")
    assert saved_steps(run_dir) == [3] and is_finished(checkpoint)
    assert f"interrupted (Ctrl-C) after step 3; checkpoint {checkpoint} holds step 3" in err
    assert "received while the checkpoint was written" in err
    assert "before training started" not in err


def test_ctrl_c_in_the_first_step_says_nothing_was_saved(data_root, tmp_path, capsys):
    config = write_config(tmp_path, signal_at_step=1)
    code = train_vllm_editor.main(cli_args(data_root, tmp_path / "records", "--max_steps", "6",
                                           "--config", config))
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted (Ctrl-C) before the first step finished; nothing was saved" in err
    assert saved_steps(only_run(tmp_path / "records")) == []


# ---------------------------------------------------------------------------------------------
# 12. An exception in a step keeps the finished steps
# ---------------------------------------------------------------------------------------------

def test_an_unexpected_error_saves_the_last_step_then_shows_the_traceback(data_root, tmp_path, capsys):
    config = write_config(tmp_path, fail_at_step=4)
    code = train_vllm_editor.main(cli_args(data_root, tmp_path / "records", "--max_steps", "6",
                                           "--config", config))
    err = capsys.readouterr().err
    assert code == 1
    run_dir = only_run(tmp_path / "records")
    checkpoint = os.path.join(run_dir, "checkpoints", "step-3")
    assert saved_steps(run_dir) == [3]
    (note,) = [line for line in err.splitlines() if line.startswith("training stopped")]  # named once
    assert note.startswith("training stopped by this error after step 3") and f"-lkpt {checkpoint}" in note
    assert err.index(note) < err.index("Traceback")  # the checkpoint first, then the error
    assert err.strip().endswith("RuntimeError: boom in step 4")


def break_pixels_keep_header(png_path: str) -> None:
    """Replace the compressed pixels of a PNG with garbage under valid chunk checksums: the header
    and Pillow's verify() pass, decoding fails (a file damaged where only a full read notices)."""
    with open(png_path, "rb") as f:
        data = f.read()
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = bytes(range(256))[:length].ljust(length, b"\x07")
        out += length.to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        pos += 12 + length
    with open(png_path, "wb") as f:
        f.write(bytes(out))


def test_a_corrupt_image_met_mid_run_is_one_line_after_the_checkpoint(tmp_path, capsys):
    data_root = str(tmp_path / "data")
    generate_toyworld(os.path.join(data_root, "toyworld"), n_train=12, n_eval=4, n_pretrain_scenes=2)
    with open(os.path.join(data_root, "toyworld", "train.json")) as f:
        raw = json.load(f)
    first_step = {int(i): step for step in (3, 2, 1) for i in batch_indices(5, step, len(raw), 4)[1]}
    bad = next(i for i, step in first_step.items() if step == 3)  # first needed by step 3
    image = os.path.join(data_root, "toyworld", raw[bad]["image"])
    break_pixels_keep_header(image)  # passes the up-front header check, fails when decoded mid-run
    code = train_vllm_editor.main(["-en", "liveedit", "-mn", "tiny-blip2", "-dna", "TOY", "--data_dir", data_root,
                                   "-bs", "4", "-rs", "5", "--max_steps", "6", "-sci", "100",
                                   "--records_dir", str(tmp_path / "records")])
    err = capsys.readouterr().err
    assert code == 2
    run_dir = only_run(tmp_path / "records")
    assert saved_steps(run_dir) == [2]
    lines = [line for line in err.splitlines() if line.startswith(("training stopped", "error:"))]
    assert lines[0].startswith("training stopped by this error after step 2")
    assert "-lkpt " + os.path.join(run_dir, "checkpoints", "step-2") in lines[0]
    assert lines[1].startswith("error: Cannot read image") and image in lines[1]
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 13. A diverging run stops at the first non-finite loss
# ---------------------------------------------------------------------------------------------

def test_a_nan_loss_stops_the_run_and_keeps_the_last_finite_step(data_root, tmp_path, capsys):
    with open(os.path.join(ROOT, "configs", "liveedit", "tiny-blip2.yaml")) as f:
        config = yaml.safe_load(f)
    config["train_cfg"]["lr"] = 1e6
    huge = tmp_path / "huge_lr.yaml"
    huge.write_text(yaml.safe_dump(config))
    code = train_vllm_editor.main(["-en", "liveedit", "-mn", "tiny-blip2", "-dna", "TOY", "--data_dir", data_root,
                                   "-bs", "4", "-rs", "1", "--max_steps", "10", "--config", str(huge),
                                   "--records_dir", str(tmp_path / "records")])
    err = capsys.readouterr().err
    assert code == 3
    run_dir = only_run(tmp_path / "records")
    checkpoint = os.path.join(run_dir, "checkpoints", "step-1")
    assert saved_steps(run_dir) == [1]
    assert (f"error: training diverged at step 2: the loss is nan; that step's update was not applied; "
            f"checkpoint {checkpoint} holds step 1") in err
    state = torch.load(os.path.join(checkpoint, TRAINER_FILE), weights_only=True)
    assert np.isfinite(state["loss"])
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(checkpoint, "editor.safetensors")).values())


def test_an_inf_gradient_is_not_applied(data_root, tmp_path):
    cfg = run_config(data_root, tmp_path / "records", config_path=write_config(tmp_path, inf_grad_at_step=3))
    with pytest.raises(TrainingDiverged, match=r"at step 3: the gradients of shift\.vector are not finite") as info:
        run_training(cfg, echo=None)
    assert info.value.step == 3 and os.path.basename(info.value.checkpoint) == "step-2"
    assert saved_steps(only_run(tmp_path / "records")) == [2]


# ---------------------------------------------------------------------------------------------
# 14. The last finished step's scalars are written however the run ends
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signal_at_step, steps", [(6, [4, 5]), (0, [4, 6])])
def test_the_last_finished_step_has_its_scalars(data_root, tmp_path, signal_at_step, steps):
    cfg = run_config(data_root, tmp_path / "records", log_every=4,
                     config_path=write_config(tmp_path, signal_at_step=signal_at_step))
    if signal_at_step:
        with pytest.raises(TrainingInterrupted):
            run_training(cfg, echo=None)
    else:
        run_training(cfg, echo=None)
    run_dir = only_run(tmp_path / "records")
    assert sorted(scalars(run_dir)) == steps
    assert sorted(scalars(run_dir, "EMA Loss")) == steps


# ---------------------------------------------------------------------------------------------
# 15. Resuming onto other data with the same record count
# ---------------------------------------------------------------------------------------------

def test_resume_checks_the_data_not_only_its_count(data_root, tmp_path):
    config = write_config(tmp_path)
    first = run_training(run_config(data_root, tmp_path / "records", max_steps=2, config_path=config), echo=None)
    other = str(tmp_path / "other")
    generate_toyworld(os.path.join(other, "toyworld"), n_train=12, n_eval=4, n_pretrain_scenes=2, seed=1)
    with pytest.raises(UserError) as info:
        run_training(run_config(other, tmp_path / "unused", max_steps=4, resume_from=first.final_checkpoint), echo=None)
    message = str(info.value)
    assert "differs from the data checkpoint" in message and first.final_checkpoint in message
    assert "-dna TOY" in message and "-dn None" in message and f"--data_dir {other}" in message

    moved = str(tmp_path / "moved")  # the same data in another folder: accepted
    shutil.copytree(data_root, moved)
    said: list[str] = []
    resumed = run_training(run_config(moved, tmp_path / "unused", max_steps=3, resume_from=first.final_checkpoint), echo=said.append)
    assert sorted(resumed.losses) == [3] and not [s for s in said if s.startswith("note:")]

    old = os.path.join(resumed.final_checkpoint, TRAINER_FILE)  # a checkpoint written before fingerprints
    state = torch.load(old, weights_only=True)
    del state["data_fingerprint"]
    torch.save(state, old)
    said.clear()
    resumed = run_training(run_config(data_root, tmp_path / "unused", max_steps=4, resume_from=resumed.final_checkpoint),
                           echo=said.append)
    assert sorted(resumed.losses) == [4]
    assert any(s.startswith("note:") and "no data fingerprint" in s for s in said)
