"""GRACE: codebook rules (add, expand, split), replacement at one layer, restore, save / load, CLI."""
from __future__ import annotations

import os

import pytest
import torch

from baseline_checks import (build_on_real_depth, config_error, logits, parameters, run_cli, same_parameters,
                             target_accuracy)
from conftest import TINY, tiny_vllm
from editors import load_editor
from utils.errors import UserError
from utils.scoring import generate_answers, teacher_forced


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from toyworld.world import generate_toyworld
    from utils.data import load_edit_dataset

    world = tmp_path_factory.mktemp("grace") / "toyworld"
    generate_toyworld(world, n_train=2, n_eval=4, n_pretrain_scenes=2)
    return load_edit_dataset("TOY", os.path.join(str(world), "eval.json"), str(world))


def probes(records):
    r = records[0]
    return [r.requests[0], r.generality["image_rephrase"][0], r.locality["text_loc"][0], r.locality["image_loc"][0]]


@pytest.mark.parametrize("name", TINY)
def test_edit_is_learned_and_restore_is_bit_identical(name, records):
    vllm = tiny_vllm(name)
    before, params = logits(vllm, probes(records)), parameters(vllm)
    editor = load_editor("grace", vllm)
    try:
        assert torch.equal(logits(vllm, probes(records)), before)
        request = records[0].requests[0]
        assert target_accuracy(vllm, request) < 1.0
        editor.edit([request])
        assert target_accuracy(vllm, request) == 1.0 and editor.num_edits == 1 and len(editor.targets) == 1
        editor.restore()
        assert editor.num_edits == 0 and not editor.targets
        assert torch.equal(logits(vllm, probes(records)), before) and same_parameters(vllm, params)
    finally:
        editor.remove()


def test_text_only_edit_and_generation_use_the_value(records):
    vllm = tiny_vllm("tiny-minigpt4")
    editor = load_editor("grace", vllm)
    text = records[1].locality["text_loc"][0]
    request = type(text)(text.prompt, "red", None)  # a text-only edit with a new answer
    try:
        editor.edit([request])
        assert target_accuracy(vllm, request) == 1.0
        # generation: the value replaces the prompt's last position and every generated token
        assert generate_answers(vllm, [request], [1], 1)[0].strip() == "red"
    finally:
        editor.remove()


def test_codebook_rules_add_expand_split():
    editor = load_editor("grace", tiny_vllm("tiny-blip2"))
    d = editor.vllm.hidden_size
    at = lambda x: torch.cat([torch.tensor([float(x)]), torch.zeros(d - 1)])  # noqa: E731
    assert editor._update_codebook(at(0), "a") == 0                 # empty: new entry, eps 1.0
    assert editor._update_codebook(at(5), "b") == 1                 # d = 5 > 1 + 1: new entry
    assert editor._update_codebook(at(1.5), "a") == 0               # same target within 1 + 1: expand
    assert editor.epsilons.tolist() == [1.5, 1.0] and len(editor.targets) == 2
    assert editor._update_codebook(at(6.2), "c") == 2               # other target within reach: split
    assert editor.epsilons.tolist() == pytest.approx([1.5, 0.6, 0.6])
    editor.remove()


def test_a_call_with_two_requests_equals_two_calls_and_save_load(records, tmp_path):
    vllm = tiny_vllm("tiny-blip2")
    editor = load_editor("grace", vllm)
    requests = [records[0].requests[0], records[1].requests[0]]
    samples = [s for r in records for s in r.requests + r.locality["text_loc"] + r.locality["image_loc"]]
    try:
        assert not editor.supports_batch_edit  # the codebook update of an edit depends on the earlier ones
        editor.edit(requests)
        together = logits(vllm, probes(records))
        assert teacher_forced(vllm, samples, 1) == teacher_forced(vllm, samples, 8)
        editor.save_edits(str(tmp_path / "edits"))
        editor.restore()
        editor.edit(requests[:1])
        editor.edit(requests[1:])
        assert torch.equal(logits(vllm, probes(records)), together)
        editor.restore()
        editor.load_edits(str(tmp_path / "edits"))
        assert torch.equal(logits(vllm, probes(records)), together) and editor.num_edits == 2
    finally:
        editor.remove()
    assert len(vllm.hooks._torch_hooks) == 0  # remove() detached the layer edit


def test_bad_config_values_name_the_key(tmp_path):
    assert "init_epsilon" in config_error("grace", tmp_path, "init_epsilon: 0\n")
    assert "lr" in config_error("grace", tmp_path, "lr: 0\n")
    assert "steps" in config_error("grace", tmp_path, "steps: -3\n")


def test_real_backbone_configs_use_layer_21_of_32():
    assert build_on_real_depth("grace") == {"blip2-opt-2.7b": 21, "llava-v1.5-7b": 21, "minigpt-4-vicuna-7b": 21}


def test_cli_runs_grace_and_refuses_a_bad_config(tmp_path, capsys):
    assert run_cli("grace", tmp_path) == 0, capsys.readouterr().err
    assert os.path.isfile(tmp_path / "res" / "grace" / "tiny-blip2" / "TOY" / "sequential_edit_2" / "results.json")
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("init_epsilon: -1\n")
    assert run_cli("grace", tmp_path, "--config", str(bad), "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "init_epsilon" in err and "Traceback" not in err
    with pytest.raises(UserError, match="layer 9"):
        load_editor("grace", tiny_vllm("tiny-blip2"), str(_yaml(tmp_path, "layer: 9\n")))


def _yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path
