"""Nothing lost, nothing silent: kills mid-run, determinism, unsafe names, odd images (issue 7).

The kill tests run the real CLIs in subprocesses and SIGKILL them, as a crash or an OOM killer would.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import ROOT, tiny_vllm
from toyworld.world import generate_toyworld

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_toyworld(str(root / "toyworld"), n_train=24, n_eval=8, n_pretrain_scenes=4)
    return str(root)


def train_cmd(data_dir, records, *extra):
    return [sys.executable, os.path.join(ROOT, "train_vllm_editor.py"), "-en", "liveedit", "-mn", "tiny-blip2",
            "-dna", "TOY", "--data_dir", data_dir, "-bs", "4", "--max_steps", "8", "-sci", "2", "-rs", "7",
            "-dbs", "2", "--records_dir", records, *extra]


def tensorboard_losses(run_dir) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "logs"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("Loss")}


def only_run(records) -> str:
    (editor,) = os.listdir(records)
    (model,) = os.listdir(os.path.join(records, editor))
    (run,) = os.listdir(os.path.join(records, editor, model))
    return os.path.join(records, editor, model, run)


def wait_for(path, proc, timeout=240):
    start = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {path} appeared: {proc.stderr.read()}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def test_training_killed_with_sigkill_resumes_to_the_same_losses(data_dir, tmp_path):
    straight = str(tmp_path / "straight")
    subprocess.run(train_cmd(data_dir, straight), env=ENV, check=True, capture_output=True, timeout=600)
    expected = tensorboard_losses(only_run(straight))
    assert sorted(expected) == list(range(1, 9))

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(train_cmd(data_dir, killed), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for(os.path.join(killed, "liveedit", "tiny-blip2"), proc)
    run_dir = only_run(killed)
    wait_for(os.path.join(run_dir, "checkpoints", "step-4", "meta.json"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resume_from = os.path.join(run_dir, "checkpoints", "step-4")
    subprocess.run(train_cmd(data_dir, killed, "-lkpt", resume_from), env=ENV, check=True,
                   capture_output=True, timeout=600)
    resumed = tensorboard_losses(run_dir)
    assert [resumed[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]


KILL_DURING_WRITE = """
import os, signal, sys
sys.argv = {argv!r}
import safetensors.torch as st
real = st.save_file
def half_then_die(tensors, path, *a, **k):
    if "step-4" in os.path.dirname(path) or ".step-4" in path:
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, *a, **k)
st.save_file = half_then_die
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path):
    records = str(tmp_path / "records")
    argv = train_cmd(data_dir, records)[1:]
    code = KILL_DURING_WRITE.format(argv=argv, script=argv[0])
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run_dir = only_run(records)
    from editors.checkpoint import find_latest

    latest = find_latest(run_dir)
    assert os.path.basename(latest) == "step-2"  # the half-written step-4 is not taken for a checkpoint
    done = subprocess.run(train_cmd(data_dir, records, "-lkpt", latest), env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "step-8", "meta.json"))


def eval_cmd(data_dir, results, *extra):
    return [sys.executable, os.path.join(ROOT, "test_vllm_edit.py"), "-en", "ft_l", "-mn", "tiny-blip2",
            "-dn", "toy", "--data_dir", data_dir, "-sen", "2", "--results_dir", results, "--no_progress",
            "--seed", "3", *extra]


def comparable(mean: dict) -> dict:
    """mean_results.json without wall-clock fields (edit_time, the run's timings)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "edit_time"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return strip({k: v for k, v in mean.items() if k != "run"})


def test_evaluation_killed_with_sigkill_resumes_to_the_same_results(data_dir, tmp_path):
    straight = str(tmp_path / "straight")
    subprocess.run(eval_cmd(data_dir, straight), env=ENV, check=True, capture_output=True, timeout=600)
    folder = os.path.join("ft_l", "tiny-blip2", "TOY", "sequential_edit_2")
    with open(os.path.join(straight, folder, "mean_results.json")) as f:
        expected = json.load(f)

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(eval_cmd(data_dir, killed), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    progress = os.path.join(killed, folder, "progress")
    wait_for(progress, proc)
    while proc.poll() is None and not any(n.endswith(".json") and "chunk" in n for n in os.listdir(progress)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(eval_cmd(data_dir, killed), env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    with open(os.path.join(killed, folder, "mean_results.json")) as f:
        assert comparable(json.load(f)) == comparable(expected)


@pytest.mark.parametrize("argv", [
    ["train_vllm_editor.py", "-en", "liveedit", "-mn", "tiny-blip2", "-dna", "TOY", "-bs", "2", "-tnp", "../../escape"],
    ["test_vllm_edit.py", "-en", "ft_l", "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "2", "-enp", "../../escape"],
    ["test_vllm_edit.py", "-en", "ft_l", "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "2", "-dvc", "cuda:3"],
])
def test_cli_refuses_unsafe_names_and_missing_devices_in_one_line(argv, data_dir, tmp_path):
    if "cuda:3" in argv:
        import torch

        if torch.cuda.device_count() > 3:
            pytest.skip("this machine has a cuda:3")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, argv[0]), *argv[1:], "--data_dir", data_dir],
                          env=ENV, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path.parent / "escape")


def test_very_large_and_odd_images_are_resized_by_the_processor(tmp_path):
    vllm = tiny_vllm("tiny-llava")
    big = tmp_path / "big.png"
    Image.new("RGBA", (2400, 1800), (10, 200, 30, 128)).save(big)
    grey16 = tmp_path / "grey16.png"
    Image.new("I;16", (300, 500), 40000).save(grey16)
    pixels = vllm.pixel_values([str(big), str(grey16)])
    size = vllm.image_processor.crop_size["height"]
    assert tuple(pixels.shape) == (2, 3, size, size)
