"""Results and run folders: write errors as one line, corrupt progress named, one writer per folder
(issue "Real checkpoints and real runs", items 19 and 20).

Tests run as root, where permissions do not stop writes: an unwritable folder is made by putting a
regular file where a folder must be.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, tiny_vllm
from editors.base import Editor
from runs.eval_config import EvalConfig
from runs.evaluation import evaluate, run_folder
from utils.data import load_edit_dataset
from utils.errors import UserError
from utils.io import LOCK_FILE, folder_atomic, folder_lock, write_atomic, write_json_atomic

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("toydata")
    generate_toyworld(str(root / "toyworld"), n_train=4, n_eval=3, n_pretrain_scenes=2)
    return str(root)


@pytest.fixture(scope="module")
def records(toy_data):
    world = os.path.join(toy_data, "toyworld")
    return load_edit_dataset("TOY", os.path.join(world, "eval.json"), world)


class NoopEditor(Editor):
    """Changes nothing (the model stays unedited); raises at edit call `fail_on` if given."""

    name = "noop"

    def __init__(self, vllm, fail_on: int | None = None):
        super().__init__(vllm, None)
        self.calls, self.fail_on, self._n = 0, fail_on, 0

    @property
    def num_edits(self) -> int:
        return self._n

    def edit(self, requests):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        self._n += len(requests)

    def restore(self):
        self._n = 0


def config(results_dir, **kw) -> EvalConfig:
    return EvalConfig(**{**dict(sequential_edit_n=1, editor_name="noop", model_name="tiny-blip2", data_name="TOY",
                                results_dir=str(results_dir), show_progress=False, tensorboard=False, plot=False,
                                exact_match=False), **kw})


def leftovers(folder) -> list[str]:
    """Temporary files or folders of atomic writes left anywhere under `folder`."""
    return [os.path.join(d, n) for d, dirs, files in os.walk(folder) for n in dirs + files
            if ".tmp-" in n or ".old-" in n]


# ---- item 19: write errors -------------------------------------------------------------------------

def test_atomic_writes_under_a_file_are_one_user_error_naming_the_path(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    target = str(blocker / "out.json")
    with pytest.raises(UserError, match=f"cannot write {target}: Not a directory"):
        write_json_atomic(target, {"a": 1})
    with pytest.raises(UserError, match="cannot write"):
        with folder_atomic(str(blocker / "edits")):
            pass
    assert leftovers(tmp_path) == []


def test_a_write_that_fails_midway_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = str(tmp_path / "results.json")
    write_json_atomic(path, {"old": True})

    def write_then_disk_full(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"new": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    with pytest.raises(UserError, match=f"cannot write {path}: No space left on device"):
        write_atomic(path, write_then_disk_full)
    assert json.loads(open(path).read()) == {"old": True}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("script", ["test_vllm_edit.py", "train_vllm_editor.py"])
@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_scripts_turn_unwritable_output_folders_into_one_line(toy_data, tmp_path, script, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("I am a file")
    out = blocker if where == "is_a_file" else blocker / "sub"
    if script == "test_vllm_edit.py":
        argv = ["-en", "ft_l", "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "1", "-dsn", "1", "--no_progress",
                "--results_dir", str(out)]
    else:
        argv = ["-en", "liveedit", "-mn", "tiny-blip2", "-dna", "TOY", "-bs", "2", "--max_steps", "1", "-rs", "0",
                "--records_dir", str(out)]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, "--data_dir", toy_data], env=ENV,
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {blocker}")
    assert "Traceback" not in proc.stderr
    assert blocker.read_text() == "I am a file"


def test_corrupt_progress_files_are_named_with_the_overwrite_hint(records, tmp_path):
    vllm = tiny_vllm("tiny-blip2")
    cfg = config(tmp_path / "results")
    first = evaluate(NoopEditor(vllm), records, cfg)
    progress = os.path.join(first.folder, "progress")
    chunk = os.path.join(progress, "chunk_00001.json")
    run_json = os.path.join(progress, "run.json")
    good_run = open(run_json).read()

    open(chunk, "w").close()  # a 0-byte chunk (a full disk, a copy cut short)
    with pytest.raises(UserError) as info:
        evaluate(NoopEditor(vllm), records, cfg)
    assert chunk in str(info.value) and "--overwrite" in str(info.value)

    for corrupt in ("", "[1, 2]", '{"identity": '):
        with open(run_json, "w") as f:
            f.write(corrupt)
        with pytest.raises(UserError) as info:
            evaluate(NoopEditor(vllm), records, cfg)
        assert run_json in str(info.value) and "--overwrite" in str(info.value)

    with open(run_json, "w") as f:
        f.write(good_run)
    again = evaluate(NoopEditor(vllm), records, config(tmp_path / "results", overwrite=True))
    assert again.chunks_run == len(records)
    assert {k: v for k, v in again.total_mean.items() if k != "reliability"} == \
        {k: v for k, v in first.total_mean.items() if k != "reliability"}  # reliability holds edit times
    assert not os.path.exists(os.path.join(first.folder, LOCK_FILE))


# ---- item 20: one writer per results folder ------------------------------------------------------------

def write_lock(folder, pid: int, host: str | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    with open(path, "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname(), "started": time.time(),
                   "started_at": "earlier", "token": "someone-else"}, f)
    return path


def test_a_live_holder_is_refused_by_pid_and_a_dead_ones_lock_is_taken_over(records, tmp_path, capfd):
    vllm = tiny_vllm("tiny-blip2")
    cfg = config(tmp_path / "results")
    folder = run_folder(cfg, "noop", vllm.name)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock = write_lock(folder, sleeper.pid)
        with pytest.raises(UserError) as info:
            evaluate(NoopEditor(vllm), records, cfg)
        assert f"process {sleeper.pid}" in str(info.value) and lock in str(info.value)
        assert not os.path.exists(os.path.join(folder, "progress"))  # nothing written beside the holder
        assert os.path.exists(lock)
    finally:
        sleeper.kill()
        sleeper.wait()

    write_lock(folder, sleeper.pid)  # now the pid of a finished process
    outcome = evaluate(NoopEditor(vllm), records, cfg)
    assert outcome.chunks_run == len(records)
    assert f"process {sleeper.pid} that held it is no longer running" in capfd.readouterr().err
    assert not os.path.exists(lock)

    write_lock(folder, os.getpid(), host="some-other-host")  # another host: cannot tell, so refuse
    with pytest.raises(UserError, match="some-other-host"):
        evaluate(NoopEditor(vllm), records, cfg)


def test_the_lock_is_released_when_the_run_fails(records, tmp_path):
    vllm = tiny_vllm("tiny-blip2")
    cfg = config(tmp_path / "results")
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(NoopEditor(vllm, fail_on=2), records, cfg)
    folder = run_folder(cfg, "noop", vllm.name)
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))
    assert evaluate(NoopEditor(vllm), records, cfg).chunks_resumed == 1


def test_two_processes_cannot_hold_one_folder(tmp_path):
    folder = str(tmp_path / "shared")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from utils.io import folder_lock\n"
                               "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
         folder], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"process {holder.pid} on host"):
            with folder_lock(folder, "another evaluation"):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    with folder_lock(folder) as path:  # taken over: its holder is dead
        assert json.load(open(path))["pid"] == os.getpid()
    assert not os.path.exists(path)
