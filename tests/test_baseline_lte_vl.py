"""LTE-VL: the editing contract on tiny-blip2 with tiny-mpnet, the edit prefix, training of the
whole LLM (checkpoint holds it), the CLI."""
from __future__ import annotations

import pytest
import torch

import trained_baseline_checks as checks
from conftest import tiny_vllm
from editors.vllms.batch import with_prefix
from utils.errors import UserError

NAME = "lte_vl"
ALWAYS = dict(retrieve_threshold=-1.0)  # every query retrieves its most similar edit


def test_no_edits_gives_identical_logits():
    checks.check_no_edits_identical(NAME, **ALWAYS)


def test_restore_is_bit_identical():
    checks.check_restore_bit_identical(NAME, **ALWAYS)


def test_scoring_batch_size_does_not_change_predictions():
    checks.check_batch_size_invariance(NAME, **ALWAYS)


def test_save_load_round_trip(tmp_path):
    checks.check_save_load(NAME, tmp_path, **ALWAYS)


@torch.no_grad()
def test_batched_edit_equals_one_by_one():
    vllm = tiny_vllm("tiny-blip2")
    editor = checks.build(NAME, **ALWAYS)
    try:
        editor.edit(checks.requests(3))
        batched = checks.label_logits(vllm, checks.queries())
        keys, prefixes = editor.keys.clone(), [p.clone() for p in editor.prefix_embeds]
        editor.restore()
        for r in checks.requests(3):
            editor.edit([r])
        torch.testing.assert_close(editor.keys, keys, rtol=1e-5, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(prefixes, editor.prefix_embeds))
        for a, b in zip(batched, checks.label_logits(vllm, checks.queries())):
            assert torch.equal(a.argmax(-1), b.argmax(-1))
    finally:
        editor.remove()


@torch.no_grad()
def test_retrieved_edit_prefix_with_its_image_goes_before_the_query():
    """The scored row = [edit image]["[Updated Information]prompt target\\n[Query]"][query row]; the
    query's labels (not the prefix's) are scored; below the threshold nothing changes."""
    vllm = tiny_vllm("tiny-blip2")
    edit, query = checks.requests(2)[0], checks.requests(3)[2]
    base = checks.label_logits(vllm, [query])[0]
    editor = checks.build(NAME, **ALWAYS)
    try:
        editor.edit([edit])
        hooked = vllm(checks.batch_of(vllm, [query]))
        with vllm.unedited():
            prefix = vllm.prepare([f"[Updated Information]{edit.prompt} {edit.target}\n[Query]"], [edit.image])
            plain = checks.batch_of(vllm, [query])
        assert prefix.has_image.all() and int(prefix.attention_mask.sum()) == len(editor.prefix_embeds[0])
        manual = with_prefix(plain, [prefix.inputs_embeds[0]])
        torch.testing.assert_close(hooked, vllm(manual))
        editor.config.retrieve_threshold = 1.0  # no cosine is above 1
        assert torch.equal(checks.label_logits(vllm, [query])[0], base)
    finally:
        editor.remove()


@torch.no_grad()
def test_retrieval_uses_the_cosine_of_prompt_against_prompt_and_target():
    editor = checks.build(NAME, retrieve_threshold=0.3)
    try:
        edits = checks.requests(2)
        editor.edit(edits)
        prompts = [q.prompt for q in checks.queries()]
        keys = editor.encode([f"{r.prompt} {r.target}" for r in edits])
        cos = editor.encode(prompts) @ keys.T
        expected = [int(c.argmax()) if c.max() > 0.3 else None for c in cos]
        assert editor.retrieve(prompts) == expected
    finally:
        editor.remove()


def test_training_loss_falls_and_trains_the_llm(tmp_path):
    from editors.vllms import build_tiny

    records = checks.toy_records(tmp_path, n_train=8)
    vllm = build_tiny("tiny-blip2")  # LTE trains the LLM: not the shared backbone
    before = {k: v.clone() for k, v in vllm.stack.state_dict().items()}
    losses = checks.train_losses(NAME, records, steps=20, batch_size=4, vllm=vllm, lr=1e-3)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    assert any(not torch.equal(before[k], v) for k, v in vllm.stack.state_dict().items())


def test_cli_train_resume_and_evaluate_and_the_checkpoint_holds_the_llm(tmp_path):
    from safetensors.torch import load_file

    from editors.checkpoint import find_latest

    checks.check_cli_train_and_evaluate(NAME, tmp_path)
    (run,) = (tmp_path / "a" / NAME / "tiny-blip2").iterdir()
    ckpt = find_latest(str(run))
    keys = load_file(f"{ckpt}/editor.safetensors").keys()
    assert any(k.startswith("llm.") and ".layers." in k for k in keys)


@pytest.mark.parametrize("key,value", [("retrieve_threshold", 2.0), ("pooling", "max"),
                                       ("retriever_model", "mpnet"), ("lr", 0.0)])
def test_bad_config_value_names_the_key(key, value):
    with pytest.raises(UserError, match=key):
        checks.build(NAME, **{key: value})
