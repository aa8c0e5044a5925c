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
