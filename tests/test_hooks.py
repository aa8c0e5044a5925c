"""The backbone's one hook mechanism (editors/vllms/hooks.py): phases, the running batch, scoped
removal, `unedited()`, per-thread call state; and that no editor reads thread-local state."""
from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_image, tiny_vllm

PROMPTS = ["what color is the shape? The answer is:", "nq question: what is the capital of x?"]
TARGETS = ["red", "pomox"]
IMAGES = [make_image(1), None]


def batch_of(vllm):
    return vllm.prepare(PROMPTS, IMAGES, TARGETS)


def recorder(calls):
    """An edit that changes nothing and records (phase, step, batch, hidden shape, memo) of each call."""
    def fn(hidden, call):
        calls.append((call.phase, call.step, call.batch, tuple(hidden.shape), call.memo))
        return None
    return fn


def shift(hidden, call):
    return hidden + 1.0  # [b, l, D]


@torch.no_grad()
def test_full_passes_hand_over_the_running_batch(vllm):
    batch, calls = batch_of(vllm), []
    with vllm.edit_layer(1, recorder(calls)):
        vllm(batch)
        hidden = vllm.hidden_at_layer(batch, 2)
        vllm.logits_from_layer(batch, hidden, 0)
    assert [(c[0], c[1]) for c in calls] == [("full", 0)] * 3
    assert all(c[2] is batch and c[3] == (2, batch.length, vllm.hidden_size) for c in calls)
    assert calls[0][2].has_image.tolist() == [True, False]
    assert calls[0][4] is not calls[1][4]  # a fresh memo per call


@torch.no_grad()
def test_generate_is_a_prefill_then_decode_steps_sharing_one_memo(vllm):
    calls = []
    with vllm.edit_layer(0, recorder(calls)):
        vllm.generate(PROMPTS, IMAGES, max_new_tokens=4)
        vllm.generate(PROMPTS[:1], IMAGES[:1], max_new_tokens=2)
    first = [c for c in calls if c[2].size == 2]
    assert first[0][0] == "prefill" and first[0][1] == 0 and first[0][3][1] == first[0][2].length
    assert [(c[0], c[1], c[3][1]) for c in first[1:]] == [("decode", i, 1) for i in range(1, len(first))]
    assert len(first) >= 2 and all(c[2] is first[0][2] and c[4] is first[0][4] for c in first)
    second = [c for c in calls if c[2].size == 1]
    assert second[0][0] == "prefill" and second[0][4] is not first[0][4]


@torch.no_grad()
def test_scoped_edit_changes_outputs_and_removal_is_bit_identical(vllm):
    batch = batch_of(vllm)
    torch_hooks = [dict(layer._forward_hooks) for layer in vllm.layers]  # transformers may hold its own
    before = vllm(batch)
    with vllm.edit_layer(1, shift) as handle:
        edited = vllm(batch)
        with vllm.unedited():
            assert torch.equal(vllm(batch), before)
        assert torch.equal(vllm(batch), edited)  # back on after the block
    assert not torch.equal(edited, before)
    assert torch.equal(vllm(batch), before)
    handle.remove()  # idempotent
    handle = vllm.edit_layer(-1, shift)  # negative indices count from the end
    assert not torch.equal(vllm(batch), before)
    handle.remove()
    assert torch.equal(vllm(batch), before)
    assert [dict(layer._forward_hooks) for layer in vllm.layers] == torch_hooks  # nothing left on the backbone


@torch.no_grad()
def test_edits_apply_in_order_and_hidden_at_layer_sees_them():
    vllm = tiny_vllm("tiny-blip2")
    batch = batch_of(vllm)
    plain = vllm.hidden_at_layer(batch, 1)
    with vllm.edit_layer(1, shift), vllm.edit_layer(1, lambda h, call: h * 2.0):
        assert torch.equal(vllm.hidden_at_layer(batch, 1), (plain + 1.0) * 2.0)
        with vllm.unedited():
            assert torch.equal(vllm.hidden_at_layer(batch, 1), plain)


@torch.no_grad()
def test_passes_outside_the_backbone_are_never_edited():
    vllm, calls = tiny_vllm("tiny-blip2"), []
    batch = batch_of(vllm)
    with vllm.edit_layer(0, recorder(calls)):
        vllm.stack.inner(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
    assert calls == []
    with pytest.raises(IndexError, match="layers 0"):
        vllm.edit_layer(vllm.num_layers, shift)


@torch.no_grad()
def test_call_state_is_per_thread():
    """A second thread (the trainer's prefetch) runs the backbone while the main thread does: each edit
    call gets its own thread's batch; `unedited()` and `hidden_at_layer`'s stop stay in their thread."""
    vllm = tiny_vllm("tiny-blip2")
    mine, theirs = batch_of(vllm), vllm.prepare(PROMPTS[:1], IMAGES[:1], TARGETS[:1])
    before_mine = vllm(mine)
    inside, release = threading.Event(), threading.Event()
    seen: dict[str, list] = {"main": [], "other": []}

    def pausing(hidden, call):  # layer 0: the other thread waits here, mid-pass, until released
        main = threading.current_thread() is threading.main_thread()
        seen["main" if main else "other"].append(call.batch)
        if not main:
            inside.set()
            assert release.wait(60)
        return hidden + 1.0

    results = {}

    def other():
        results["hidden"] = vllm.hidden_at_layer(theirs, 2)  # edited; stops after layer 2

    with vllm.edit_layer(0, pausing), vllm.edit_layer(1, shift):
        thread = threading.Thread(target=other)
        thread.start()
        try:
            assert inside.wait(60)
            edited_mine = vllm(mine)  # passes layer 2, where the other thread's pass will stop
            with vllm.unedited():  # off in the main thread only: the other thread's layer-1 edit still runs
                unedited_mine = vllm(mine)
                release.set()
                thread.join(60)
        finally:
            release.set()
        expected = vllm.hidden_at_layer(theirs, 2)  # both edits, in the main thread
    assert torch.equal(unedited_mine, before_mine)
    assert not torch.equal(edited_mine, before_mine) and edited_mine.shape == before_mine.shape
    assert torch.equal(results["hidden"], expected)
    assert seen["main"] and all(b is mine or b is theirs for b in seen["main"])
    assert seen["other"] == [theirs]


def test_no_editor_reads_thread_local_state():
    """Only the backbone's hook module keeps per-thread call state; editors get it as an argument."""
    pattern = re.compile(r"threading\.local|active_batch|_running\b")
    allowed = {Path(ROOT, "editors", "vllms", "hooks.py")}
    offenders = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
                 for path in sorted(Path(ROOT, "editors").rglob("*.py")) if path not in allowed
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
