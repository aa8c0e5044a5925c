"""The issue's two commands on a tiny processor-driven backbone (tests/test_hf_<family>.py call it):
train LiveEdit for 2 steps on a tiny toy world, then evaluate 2-edit chunks of 4 records with the checkpoint."""
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
