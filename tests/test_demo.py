"""run_demo.py's decision to start its evaluations over (the stages themselves run in `make demo`)."""
from __future__ import annotations

import json

from run_demo import inputs_changed


def test_demo_starts_evaluations_over_when_any_input_changed(tmp_path):
    path = str(tmp_path / "eval_inputs.json")
    inputs = {"backbone": "records/pretrained/tiny-blip2-abc", "checkpoint": "ckpt/step-6000",
              "eval_records": 200, "data_dir": "data"}
    assert inputs_changed(path, inputs)  # never ran
    with open(path, "w") as f:
        json.dump(inputs, f)
    assert not inputs_changed(path, inputs)
    for key, other in (("backbone", "records/pretrained/tiny-blip2-def"), ("checkpoint", "ckpt/step-20"),
                       ("eval_records", 20), ("data_dir", "elsewhere")):
        assert inputs_changed(path, {**inputs, key: other}), key


def test_demo_starts_over_results_of_another_configuration_in_its_own_folder(tmp_path, monkeypatch):
    """An upgrade that changes what the run identity holds must not stop `make demo` with 'pass --overwrite'."""
    import run_demo
    from conftest import tiny_vllm
    from toyworld.world import generate_toyworld
    from utils.data import load_edit_dataset

    world = tmp_path / "toyworld"
    generate_toyworld(world, n_train=2, n_eval=4, n_pretrain_scenes=2)
    records = load_edit_dataset("TOY", str(world / "eval.json"), str(world))
    monkeypatch.setattr(run_demo, "RESULTS_DIR", str(tmp_path / "results"))
    vllm = tiny_vllm("tiny-blip2")
    first = run_demo.evaluate(vllm, "none", 2, records)
    changed = [r.__class__(**{**r.__dict__, "original_answer": "other"}) for r in records]  # another fingerprint
    assert run_demo.evaluate(vllm, "none", 2, changed) == first
