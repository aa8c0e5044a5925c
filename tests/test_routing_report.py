"""Routing diagnostics (runs/routing_report.py, LiveEdit.routing_of): they must say what routing did."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import make_image, tiny_vllm
from editors import load_editor
from runs.evaluation import EvalConfig, evaluate
from test_liveedit import force_routing
from utils.data import load_edit_dataset
from utils.records import Sample


@pytest.fixture
def editor():
    torch.manual_seed(0)
    ed = load_editor("liveedit", tiny_vllm("tiny-blip2"))
    yield ed
    ed.remove()


def samples(n: int) -> list[Sample]:
    return [Sample(f"what shape is thing {i}? The answer is:", f"answer {i}", make_image(200 + i)) for i in range(n)]


def test_routing_of_reports_selected_experts_and_the_own_expert(editor):
    edits = samples(3)
    assert editor.routing_of(edits, [0, 1, 2], batch_size=2) == [
        {"selected": 0, "own_selected": False, "own_weight": 0.0}] * 3  # no edits: nothing routed
    force_routing(editor)  # every image row selects every expert (edit keys are made with the forced weights)
    editor.edit(edits)
    rows = editor.routing_of(edits, [0, 1, None], batch_size=2)
    assert [r["selected"] for r in rows] == [3, 3, 3]
    assert [r["own_selected"] for r in rows] == [True, True, False]
    assert 0 < rows[0]["own_weight"] < 1 and rows[2]["own_weight"] == 0.0


def test_evaluation_writes_routing_diagnostics_to_results_and_tensorboard(editor, tmp_path):
    from toyworld.world import generate_toyworld

    world = tmp_path / "toyworld"
    generate_toyworld(world, n_train=2, n_eval=4, n_pretrain_scenes=2)
    records = load_edit_dataset("TOY", str(world / "eval.json"), str(world))
    force_routing(editor)
    cfg = EvalConfig(sequential_edit_n=2, results_dir=str(tmp_path / "res"), exact_match=False, show_progress=False)
    out = evaluate(editor, records, cfg)
    with open(os.path.join(out.folder, "mean_results.json")) as f:
        routing = json.load(f)["routing"]
    assert routing["rel"]["n"] == 4 and routing["rel"]["own_selected"] == 1.0
    assert routing["rel"]["selected_mean"] == 2.0  # two edits per chunk, both selected
    assert routing["m_gen"]["own_selected"] == 1.0 and routing["m_loc"]["routed"] == 1.0  # forced: everything routes
    events = EventAccumulator(glob.glob(os.path.join(out.folder, "tb", "events.out.tfevents.*"))[0])
    events.Reload()
    assert "routing/m_loc/routed" in events.Tags()["scalars"]
    quiet = evaluate(editor, records, EvalConfig(sequential_edit_n=2, results_dir=str(tmp_path / "res2"),
                                                 exact_match=False, show_progress=False, routing_diagnostics=False))
    with open(os.path.join(quiet.folder, "mean_results.json")) as f:
        assert "routing" not in json.load(f)


def test_lifelong_checkpoints_carry_the_routing_curve(editor, tmp_path):
    from toyworld.world import generate_toyworld

    world = tmp_path / "toyworld"
    generate_toyworld(world, n_train=2, n_eval=3, n_pretrain_scenes=2)
    records = load_edit_dataset("TOY", str(world / "eval.json"), str(world))
    force_routing(editor)
    out = evaluate(editor, records, EvalConfig(sequential_edit_n=2, lifelong=True, results_dir=str(tmp_path),
                                               exact_match=False, show_progress=False))
    curve = [(c["edits"], c["routing"]["rel"]["selected_mean"]) for c in out.lifelong]
    assert curve == [(1, 1.0), (3, 3.0)]  # forced routing selects every stored expert
    assert all(c["routing"]["rel"]["own_selected"] == 1.0 for c in out.lifelong)
