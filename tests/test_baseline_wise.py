"""WISE: side memory on one FFN value matrix, activation routing, knowledge shards and Ties-Merge."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_vllm
from editors.baselines.wise_memory import ties_merge, trim
from ffn_editor_checks import (assert_backbone_unchanged, check_bad_config, check_cli, check_real_configs,
                               editor_on, logits, parameters, target_accuracy, toy_records, toy_world)
from utils.scoring import teacher_forced

QUICK = dict(n_iter=30)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return toy_records(toy_world(tmp_path_factory.mktemp("wise")))


def samples_of(records):
    return [s for r in records for s in r.requests + r.locality["text_loc"] + r.locality["image_loc"]]


def test_ties_merge_trims_elects_the_sign_and_takes_the_disjoint_mean():
    a = torch.tensor([3.0, -1.0, 0.0, 2.0, 0.5])
    b = torch.tensor([1.0, 2.0, 4.0, -6.0, 0.0])
    assert torch.equal(trim(a, 0.6), torch.tensor([3.0, -1.0, 0.0, 2.0, 0.0]))  # 3 of 5 kept
    merged = ties_merge([a, b], 1.0)
    # entry 0: both +: mean 2; entry 1: sum +1 -> only b's 2; entry 2: only b; entry 3: sum -4 -> b's -6
    assert torch.equal(merged, torch.tensor([2.0, 2.0, 4.0, -6.0, 0.5]))
    sparse = torch.tensor([0.0, 0.0, 5.0, 0.0])
    assert torch.equal(ties_merge([sparse], 0.53), sparse)  # a single shard sparser than the density is kept


@pytest.mark.parametrize("name", ["tiny-blip2", "tiny-llava"])
def test_edit_fixes_the_answer_routes_and_restores_bit_identically(name, records):
    vllm = tiny_vllm(name)
    probe = samples_of(records)
    before, params = logits(vllm, probe), parameters(vllm)
    request, text_loc = records[0].requests[0], records[0].locality["text_loc"][0]
    editor = editor_on("wise", vllm, **QUICK)
    try:
        assert torch.equal(logits(vllm, probe), before)  # hooks in place, no edit: identical
        assert target_accuracy(vllm, request) < 1.0
        editor.edit([request])
        assert target_accuracy(vllm, request) == 1.0 and editor.num_edits == 1
        assert editor.memory.effective is not None and 0 < editor.threshold < float("inf")
        # the text-only locality query scores below the threshold: its row is the main memory's, bit for bit
        row = logits(vllm, [text_loc])
        with vllm.unedited():
            assert torch.equal(row, logits(vllm, [text_loc]))
        editor.restore()
        assert torch.equal(logits(vllm, probe), before) and editor.num_edits == 0
        assert_backbone_unchanged(vllm, params)
    finally:
        editor.remove()


def test_shards_fill_in_turn_and_merge_keeps_both_edits(records):
    vllm = tiny_vllm("tiny-blip2")
    requests = [records[0].requests[0], records[1].requests[0]]
    editor = editor_on("wise", vllm, shard_size=1, num_shards=2, **QUICK)
    try:
        first_masks = [m.clone() for m in editor.memory.masks]
        editor.edit(requests[:1])
        assert editor.memory.current == 1 and editor.memory.fill == [1, 0]
        changed = editor.memory.shards[0] != 0
        assert changed.any() and not (changed & ~first_masks[0]).any()  # only shard 0's subspace moved
        editor.edit(requests[1:])  # shard 1 full too: merged, a new round with fresh masks
        assert editor.memory.current == 0 and editor.memory.shards == [None, None] and editor.num_edits == 2
        assert not torch.equal(editor.memory.masks[0], first_masks[0])
        assert torch.equal(editor.memory.effective, editor.memory.base)
        assert all(target_accuracy(vllm, r) == 1.0 for r in requests)
        editor.restore()  # back to the first round's masks and generator state
        assert all(torch.equal(a, b) for a, b in zip(editor.memory.masks, first_masks))
    finally:
        editor.remove()


def test_save_load_round_trip(records, tmp_path):
    vllm = tiny_vllm("tiny-blip2")
    probe = samples_of(records)
    editor = editor_on("wise", vllm, shard_size=1, num_shards=3, **QUICK)
    try:
        editor.edit([records[0].requests[0]])
        editor.save_edits(str(tmp_path / "edits"))
        saved = logits(vllm, probe)
        editor.restore()
        editor.load_edits(str(tmp_path / "edits"))
        assert torch.equal(logits(vllm, probe), saved) and editor.num_edits == 1
        editor.edit([records[1].requests[0]])  # continues in shard 1 with the saved masks / generator
        again = logits(vllm, probe)
        editor.restore()
        editor.edit([records[0].requests[0]])
        editor.edit([records[1].requests[0]])
        assert torch.equal(logits(vllm, probe), again)
    finally:
        editor.remove()


def test_scores_do_not_depend_on_the_batch_size(records):
    vllm = tiny_vllm("tiny-blip2")
    samples = samples_of(records)
    editor = editor_on("wise", vllm, **QUICK)
    try:
        editor.edit([records[0].requests[0], records[1].requests[0]])
        one = teacher_forced(vllm, samples, batch_size=1).predicted
        eight = teacher_forced(vllm, samples, batch_size=8).predicted
        assert one == eight
        assert not editor.supports_batch_edit
    finally:
        editor.remove()


def test_bad_config_values_name_the_key(tmp_path):
    check_bad_config("wise", "mask_ratio", 1.5, tmp_path)
    check_bad_config("wise", "num_shards", 0, tmp_path)
    check_bad_config("wise", "memory_corpus", str(tmp_path / "missing.txt"), tmp_path)
    check_bad_config("wise", "layer", -9, tmp_path)


def test_real_backbone_configs_build_at_real_depth():
    check_real_configs("wise", 27)


def test_cli_runs_wise(tmp_path):
    check_cli("wise", tmp_path)
