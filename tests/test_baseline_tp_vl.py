"""TP-VL (T-Patcher): one trained neuron per edit in the last FFN; restore, save / load, memory text, CLI."""
from __future__ import annotations

import os

import pytest
import torch

from baseline_checks import (build_on_real_depth, config_error, logits, parameters, run_cli, same_parameters,
                             target_accuracy)
from conftest import TINY, tiny_vllm
from editors import load_editor
from editors.baselines import memory_text
from utils.errors import UserError
from utils.scoring import teacher_forced


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from toyworld.world import generate_toyworld
    from utils.data import load_edit_dataset

    world = tmp_path_factory.mktemp("tp") / "toyworld"
    generate_toyworld(world, n_train=2, n_eval=4, n_pretrain_scenes=2)
    return load_edit_dataset("TOY", os.path.join(str(world), "eval.json"), str(world))


def probes(records):
    """Edit request, its rephrase, a text-only and an image locality sample."""
    r = records[0]
    return [r.requests[0], r.generality["image_rephrase"][0], r.locality["text_loc"][0], r.locality["image_loc"][0]]


@pytest.mark.parametrize("name", TINY)
def test_edit_is_learned_and_restore_is_bit_identical(name, records):
    vllm = tiny_vllm(name)
    before, params = logits(vllm, probes(records)), parameters(vllm)
    editor = load_editor("tp_vl", vllm)
    try:
        assert torch.equal(logits(vllm, probes(records)), before)  # built, no edit: nothing changes
        request = records[0].requests[0]
        assert target_accuracy(vllm, request) < 1.0
        editor.edit([request])
        assert target_accuracy(vllm, request) == 1.0 and editor.num_edits == 1
        assert editor.patches["key"].shape == (1, vllm.hidden_size)
        editor.edit([records[1].requests[0]])
        assert editor.num_edits == 2 and editor.patches["value"].shape[0] == 2  # patches accumulate
        editor.restore()
        assert editor.num_edits == 0
        assert torch.equal(logits(vllm, probes(records)), before) and same_parameters(vllm, params)
    finally:
        editor.remove()


def test_a_call_with_two_requests_equals_two_calls(records):
    vllm = tiny_vllm("tiny-blip2")
    editor = load_editor("tp_vl", vllm)
    requests = [records[0].requests[0], records[1].requests[0]]
    try:
        assert not editor.supports_batch_edit  # one neuron per edit, trained alone (the paper)
        editor.edit(requests)
        together = logits(vllm, probes(records))
        editor.restore()
        editor.edit(requests[:1])
        editor.edit(requests[1:])
        assert torch.equal(logits(vllm, probes(records)), together)
    finally:
        editor.remove()


def test_save_load_round_trip_and_scoring_batch_size(records, tmp_path):
    vllm = tiny_vllm("tiny-llava")
    editor = load_editor("tp_vl", vllm)
    samples = [s for r in records for s in r.requests + r.locality["text_loc"] + r.locality["image_loc"]]
    try:
        editor.edit([records[0].requests[0], records[2].requests[0]])
        edited = logits(vllm, probes(records))
        assert teacher_forced(vllm, samples, 1) == teacher_forced(vllm, samples, 8)
        editor.save_edits(str(tmp_path / "edits"))
        editor.restore()
        editor.load_edits(str(tmp_path / "edits"))
        assert torch.equal(logits(vllm, probes(records)), edited) and editor.num_edits == 2
        # the generator state travels too: the next edit draws the same memory paragraph as without the save
        editor.edit([records[3].requests[0]])
        resumed = editor.patches["key"].clone()
        editor.restore()
        editor.edit([records[0].requests[0], records[2].requests[0], records[3].requests[0]])
        assert torch.equal(editor.patches["key"], resumed)
    finally:
        editor.remove()
    other = load_editor("grace", vllm)
    with pytest.raises(UserError, match="other edits"):
        other.load_edits(str(tmp_path / "edits"))


def test_memory_text_file_env_var_and_errors(tmp_path, monkeypatch):
    long = " ".join(f"word{i}" for i in range(25))
    corpus = tmp_path / "wiki.txt"
    corpus.write_text(f" = Heading = \n{long}\nshort line\n = = {long} = = \n\n{long} again\n")
    assert memory_text.load_paragraphs(str(corpus), 20) == [long, f"{long} again"]
    toy = memory_text.load_paragraphs(None, 20)  # offline default: the toy world's text facts
    assert len(toy) == 10 and all(len(p.split()) >= 20 for p in toy)
    with pytest.raises(UserError, match="memory_corpus") as exc:
        memory_text.load_paragraphs(str(tmp_path / "missing.txt"), 20)
    assert "missing.txt" in str(exc.value)
    with pytest.raises(UserError, match="memory_min_words"):
        memory_text.load_paragraphs(str(corpus), 100)
    monkeypatch.setenv(memory_text.ENV_VAR, str(corpus))
    editor = load_editor("tp_vl", tiny_vllm("tiny-blip2"))
    assert editor.config.memory_corpus == str(corpus) and editor.paragraphs == [long, f"{long} again"]
    editor.remove()


def test_bad_config_values_name_the_key(tmp_path):
    assert "lr" in config_error("tp_vl", tmp_path, "lr: -1\n")
    assert "steps" in config_error("tp_vl", tmp_path, "steps: 0\n")
    assert "memory_weight" in config_error("tp_vl", tmp_path, "memory_weight: -0.5\n")
    with pytest.raises(UserError, match="layer 7"):
        load_editor("tp_vl", tiny_vllm("tiny-blip2"), str(_yaml(tmp_path, "layer: 7\n")))


def _yaml(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_real_backbone_configs_patch_the_last_of_32_layers():
    assert build_on_real_depth("tp_vl") == {"blip2-opt-2.7b": 31, "llava-v1.5-7b": 31, "minigpt-4-vicuna-7b": 31}


def test_cli_runs_tp_vl_on_the_toy_world(tmp_path, capsys):
    assert run_cli("tp_vl", tmp_path) == 0, capsys.readouterr().err
    assert os.path.isfile(tmp_path / "res" / "tp_vl" / "tiny-blip2" / "TOY" / "sequential_edit_2" / "results.json")
