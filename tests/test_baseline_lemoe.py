"""LEMoE-VL: buffered LoRA experts on one FFN, softmax router, pending edits flushed before inference."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_vllm
from ffn_editor_checks import (assert_backbone_unchanged, check_bad_config, check_cli, check_real_configs,
                               editor_on, logits, parameters, target_accuracy, toy_records, toy_world)
from utils.scoring import teacher_forced

# A random tiny backbone needs a larger step than the paper's lr 1e-4 to flip an answer in 100 steps
# (its 64-wide FFN makes Adam's per-entry steps add up to a far smaller output change than at width 2560).
FAST = dict(lr=1e-2)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return toy_records(toy_world(tmp_path_factory.mktemp("lemoe")))


@pytest.fixture
def blip2():
    return tiny_vllm("tiny-blip2")


def samples_of(records):
    return [s for r in records for s in r.requests + r.locality["text_loc"] + r.locality["image_loc"]]


def test_no_edits_gives_identical_logits_and_restore_is_bit_identical(blip2, records):
    probe = samples_of(records)[:6]
    before, params = logits(blip2, probe), parameters(blip2)
    editor = editor_on("lemoe_vl", blip2, **FAST)
    try:
        assert torch.equal(logits(blip2, probe), before) and editor.num_edits == 0
        editor.edit([records[0].requests[0]])
        assert not torch.equal(logits(blip2, probe), before)  # the pending edit was trained at this pass
        editor.restore()
        assert torch.equal(logits(blip2, probe), before) and editor.num_edits == 0
        assert_backbone_unchanged(blip2, params)
    finally:
        editor.remove()
    assert torch.equal(logits(blip2, probe), before)


@pytest.mark.parametrize("name", ["tiny-blip2", "tiny-llava"])
def test_pending_edit_is_trained_at_scoring_and_fixes_the_answer(name, records):
    vllm = tiny_vllm(name)
    request = records[0].requests[0]
    editor = editor_on("lemoe_vl", vllm, **FAST)
    try:
        assert target_accuracy(vllm, request) < 1.0
        editor.edit([request])
        assert editor.pending and not editor.experts  # 1 < lora_edit_batch_size: buffered only
        assert target_accuracy(vllm, request) == 1.0  # inference flushed it into one expert
        assert len(editor.experts) == 1 and not editor.pending and editor.num_edits == 1
        editor.restore()
        editor.edit([request])
        assert vllm.generate([request.prompt], [request.image], max_new_tokens=2)  # generating flushes too
        assert len(editor.experts) == 1 and not editor.pending
    finally:
        editor.remove()


def test_router_key_is_trained_and_old_experts_stay_frozen(blip2, records):
    editor = editor_on("lemoe_vl", blip2, lora_edit_batch_size=1, max_steps=5, min_loss=0.0, **FAST)
    initial, new_expert = [], editor._new_expert

    def spy():
        expert = new_expert()
        initial.append({k: v.detach().clone() for k, v in expert.items()})
        return expert

    editor._new_expert = spy
    try:
        editor.edit([records[0].requests[0]])
        first = {k: v.clone() for k, v in editor.experts[0].items()}
        editor.edit([records[1].requests[0]])  # two experts: the softmax gives the keys a gradient
        assert all(torch.equal(editor.experts[0][k], first[k]) for k in first)  # frozen after its training
        for part in ("key", "w_down", "w_up", "c1"):  # the key was left out of the authors' optimiser (W-19)
            assert not torch.equal(editor.experts[1][part], initial[1][part])
        assert not editor.experts[1]["key"].requires_grad
    finally:
        editor.remove()


def test_batched_edit_equals_one_by_one(blip2, records):
    requests = [r.requests[0] for r in records[:3]]
    states = []
    for batched in (True, False):
        editor = editor_on("lemoe_vl", blip2, lora_edit_batch_size=2, max_steps=5, **FAST)
        try:
            if batched:
                editor.edit(requests)
            else:
                for request in requests:
                    editor.edit([request])
            states.append(([{k: v.clone() for k, v in e.items()} for e in editor.experts], list(editor.pending)))
        finally:
            editor.remove()
    (experts_a, pending_a), (experts_b, pending_b) = states
    assert len(experts_a) == len(experts_b) == 1 and pending_a == pending_b == requests[2:]
    assert all(torch.equal(experts_a[0][k], experts_b[0][k]) for k in experts_a[0])


def test_save_load_round_trip_with_pending_edits(blip2, records, tmp_path):
    requests = [r.requests[0] for r in records[:3]]
    probe = samples_of(records)[:6]
    editor = editor_on("lemoe_vl", blip2, lora_edit_batch_size=2, max_steps=5, **FAST)
    try:
        editor.edit(requests)  # one expert + one pending edit
        editor.save_edits(str(tmp_path / "edits"))
        after = logits(blip2, probe)  # flushes the pending edit into a second expert
        editor.restore()
        editor.load_edits(str(tmp_path / "edits"))
        assert len(editor.experts) == 1 and editor.pending == requests[2:] and editor.num_edits == 3
        assert torch.equal(logits(blip2, probe), after)  # the same second expert, from the saved generator
    finally:
        editor.remove()


def test_scores_do_not_depend_on_the_batch_size(blip2, records):
    samples = samples_of(records)
    editor = editor_on("lemoe_vl", blip2, lora_edit_batch_size=2, **FAST)
    try:
        editor.edit([r.requests[0] for r in records[:3]])
        one = teacher_forced(blip2, samples, batch_size=1).predicted
        eight = teacher_forced(blip2, samples, batch_size=8).predicted
        assert one == eight and len(editor.experts) == 2
    finally:
        editor.remove()


def test_bad_config_values_name_the_key(tmp_path):
    check_bad_config("lemoe_vl", "rank", 0, tmp_path)
    check_bad_config("lemoe_vl", "lr", -1.0, tmp_path)
    check_bad_config("lemoe_vl", "layer", 99, tmp_path)


def test_real_backbone_configs_build_at_real_depth():
    check_real_configs("lemoe_vl", 30)


def test_cli_runs_lemoe(tmp_path):
    check_cli("lemoe_vl", tmp_path)
