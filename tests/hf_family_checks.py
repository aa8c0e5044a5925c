"""Checks that tests/test_hf_<family>.py run for each processor-driven family beyond Qwen: the issue's two
commands on its tiny backbone, and LiveEdit's real config on a tiny model of the real depth loaded by the real name."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

from conftest import ROOT


def train_then_evaluate(tmp_path, name: str) -> str:
    """Run both scripts for backbone `name` in `tmp_path`; assert each exits 0 without a traceback.
    Returns the path of the evaluation's results.json."""
    from toyworld.world import generate_toyworld

    generate_toyworld(str(tmp_path / "data" / "toyworld"), n_train=8, n_eval=4, n_pretrain_scenes=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    common = ["--data_dir", str(tmp_path / "data")]
    train = subprocess.run([sys.executable, os.path.join(ROOT, "train_vllm_editor.py"), "-en", "liveedit", "-mn", name,
                            "-dna", "TOY", "-bs", "2", "--max_steps", "2", "--records_dir", str(tmp_path / "records"),
                            *common], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0 and "Traceback" not in train.stderr, train.stderr[-2000:]
    (checkpoint,) = glob.glob(str(tmp_path / "records" / "liveedit" / name / "*" / "checkpoints" / "step-2"))
    evaluate = subprocess.run([sys.executable, os.path.join(ROOT, "test_vllm_edit.py"), "-en", "liveedit", "-mn", name,
                               "-dn", "TOY", "-sen", "2", "-dsn", "4", "-ckpt", checkpoint,
                               "--results_dir", str(tmp_path / "results"), "--no_progress", *common],
                              cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0 and "Traceback" not in evaluate.stderr, evaluate.stderr[-2000:]
    (results,) = glob.glob(str(tmp_path / "results" / "liveedit" / name / "TOY" / "*" / "results.json"))
    return results


def liveedit_at_the_real_depth(tmp_path, real: str, tiny: str, layers: int) -> int:
    """Build LiveEdit with `configs/liveedit/<real>.yaml` on a `tiny` model of `layers` decoder layers saved in
    the real layout (save_pretrained of model and processor) and loaded as `real`; returns its l_e, checked
    to be the paper's relative depth (21 of 32 layers)."""
    from editors import load_editor
    from editors.vllms import TinySpec, load_vllm
    from editors.vllms.tiny_vlm import build_tiny_vlm

    small = build_tiny_vlm(tiny, TinySpec(num_layers=layers, hidden_size=32, vision_hidden_size=32, vision_layers=1))
    small.model.save_pretrained(str(tmp_path))
    small.processor.save_pretrained(str(tmp_path))
    vllm = load_vllm(real, path=str(tmp_path))
    editor = load_editor("liveedit", vllm)
    try:
        assert vllm.name == real and vllm.num_layers == layers
        assert editor.config.edit_layer_i == round(21 / 31 * (layers - 1))
        return editor.config.edit_layer_i
    finally:
        editor.remove()
