"""RECIPE-VL: the editing contract on tiny-blip2 with tiny-roberta, retrieval, training, the CLI."""
from __future__ import annotations

import pytest
import torch

import trained_baseline_checks as checks
from conftest import tiny_vllm
from editors.vllms.batch import with_prefix
from utils.errors import UserError

NAME = "recipe_vl"


def always_retrieve_first(editor):
    """Make the prototype lose to every edit: retrieval then returns each query's top-1 edit."""
    editor.krm.prototype_rep = lambda: torch.full((1, editor.config.rep_dim), -1e4)


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setitem(checks.SETUP, NAME, always_retrieve_first)


def test_no_edits_gives_identical_logits(forced):
    checks.check_no_edits_identical(NAME)


def test_restore_is_bit_identical(forced):
    checks.check_restore_bit_identical(NAME)


def test_scoring_batch_size_does_not_change_predictions(forced):
    checks.check_batch_size_invariance(NAME)


def test_save_load_round_trip(tmp_path, forced):
    checks.check_save_load(NAME, tmp_path)


@torch.no_grad()
def test_batched_edit_equals_one_by_one(forced):
    vllm = tiny_vllm("tiny-blip2")
    editor = checks.build(NAME)
    try:
        editor.edit(checks.requests(3))
        batched = checks.label_logits(vllm, checks.queries())
        keys, prompts = editor.keys.clone(), editor.prompts.clone()
        editor.restore()
        for r in checks.requests(3):
            editor.edit([r])
        torch.testing.assert_close(editor.keys, keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(editor.prompts, prompts, rtol=1e-5, atol=1e-6)
        for a, b in zip(batched, checks.label_logits(vllm, checks.queries())):
            assert torch.equal(a.argmax(-1), b.argmax(-1))
    finally:
        editor.remove()


@torch.no_grad()
def test_retrieved_prompt_goes_before_the_row_and_the_image_is_kept(forced):
    """The scored row = [prompt tokens of the retrieved edit][image][BOS prompt target]: the same
    logits as building that row by hand (image kept, W-19), and rows that retrieve nothing keep
    the base logits."""
    vllm = tiny_vllm("tiny-blip2")
    query = checks.requests(1)[0]
    base = checks.label_logits(vllm, [query])[0]
    editor = checks.build(NAME)
    try:
        editor.edit(checks.requests(2))
        j = editor.retrieve([query.prompt])[0]
        hooked = vllm(checks.batch_of(vllm, [query]))
        with vllm.unedited():
            plain = checks.batch_of(vllm, [query])
        assert plain.has_image.all()
        manual = with_prefix(plain, [editor.prompts[j]])
        torch.testing.assert_close(hooked, vllm(manual))
        editor.retrieve = lambda prompts: [None] * len(prompts)
        assert torch.equal(checks.label_logits(vllm, [query])[0], base)
    finally:
        editor.remove()


@torch.no_grad()
def test_trained_prototype_decides_retrieval():
    """With the real prototype, a query retrieves only when its top-1 similarity beats the prototype's."""
    vllm = tiny_vllm("tiny-blip2")
    from editors.baselines.recipe import RECIPE, RECIPEConfig
    editor = RECIPE(vllm, RECIPEConfig(knowledge_model="tiny-roberta", rep_dim=32))
    try:
        editor.edit(checks.requests(2))
        prompts = [q.prompt for q in checks.queries()]
        queries = editor.krm(prompts, "q")
        sims = editor.similarity(queries, editor.keys)
        proto = editor.similarity(queries, editor.krm.prototype_rep())[:, 0]
        expected = [int(s.argmax()) if s.max() > p else None for s, p in zip(sims, proto)]
        assert editor.retrieve(prompts) == expected
    finally:
        editor.remove()


def test_training_loss_falls(tmp_path):
    records = checks.toy_records(tmp_path, n_train=8)
    losses = checks.train_losses(NAME, records, steps=24, batch_size=4, lr=3e-3)
    assert sum(losses[-6:]) < 0.85 * sum(losses[:6]), losses


def test_cli_train_resume_and_evaluate(tmp_path):
    checks.check_cli_train_and_evaluate(NAME, tmp_path)


@pytest.mark.parametrize("key,value", [("rep_dim", 0), ("hinge_scale", -1.0), ("knowledge_model", "gpt"),
                                       ("loc_lambda", -1.0)])
def test_bad_config_value_names_the_key(key, value):
    with pytest.raises(UserError, match=key):
        checks.build(NAME, **{key: value})
