"""SERAC-VL: the editing contract on tiny-blip2 with the tiny aux stand-ins, training, the CLI."""
from __future__ import annotations

import pytest
import torch

import trained_baseline_checks as checks
from conftest import tiny_vllm
from utils.errors import UserError
from utils.records import Sample

NAME = "serac_vl"
ALWAYS = dict(scope_threshold=-1e9)   # every row in scope: the counterfactual path always runs
NEVER = dict(scope_threshold=1e9)


def test_no_edits_gives_identical_logits():
    checks.check_no_edits_identical(NAME, **ALWAYS)


def test_restore_is_bit_identical():
    checks.check_restore_bit_identical(NAME, **ALWAYS)


def test_scoring_batch_size_does_not_change_predictions():
    checks.check_batch_size_invariance(NAME, **ALWAYS)


def test_save_load_round_trip(tmp_path):
    checks.check_save_load(NAME, tmp_path, **ALWAYS)


@torch.no_grad()
def test_out_of_scope_rows_and_text_rows_keep_the_base_logits():
    vllm = tiny_vllm("tiny-blip2")
    base = checks.label_logits(vllm, checks.queries())
    editor = checks.build(NAME, **NEVER)
    try:
        editor.edit(checks.requests(2))
        assert all(torch.equal(a, b) for a, b in zip(base, checks.label_logits(vllm, checks.queries())))
        editor.config.scope_threshold = -1e9  # now every row, the text-only one too, is replaced
        edited = checks.label_logits(vllm, checks.queries())
        assert all(not torch.equal(a, b) for a, b in zip(base, edited))
    finally:
        editor.remove()


@torch.no_grad()
def test_in_scope_rows_use_the_best_edit_and_the_counterfactual_model():
    """The hooked logits of an in-scope row equal the counterfactual model run by hand on
    [best edit ; row] through the backbone's final norm and LM head."""
    vllm = tiny_vllm("tiny-blip2")
    editor = checks.build(NAME, **ALWAYS)
    try:
        editor.edit(checks.requests(3))
        query = checks.requests(3)[1]
        batch = checks.batch_of(vllm, [query])
        hooked = vllm(batch)[0]  # [l, D]
        rows, which = editor._route(batch)
        assert rows.tolist() == [0]
        out = editor.counterfactual([editor.edit_embeds[int(which[0])]], [batch.inputs_embeds[0]])[0]
        final = vllm.stack.run_from(out[None].to(vllm.dtype), batch.attention_mask, batch.position_ids,
                                    vllm.num_layers)
        torch.testing.assert_close(hooked, vllm.stack.lm_head(final)[0], rtol=1e-5, atol=1e-5)
        # the same edit is the best for the edit's own request once the keys are those of the query
        editor.keys[1] = editor.scope_reps(editor.query_rows(batch))[0] * 100
        assert editor._route(batch)[1].tolist() == [1]
    finally:
        editor.remove()


@torch.no_grad()
def test_generate_with_cache_matches_teacher_forced_greedy():
    """Greedy generation under SERAC (KV cache for the backbone, the counterfactual sequence grown by
    the chosen tokens) gives the tokens a full forward on prompt + those tokens predicts."""
    vllm = tiny_vllm("tiny-blip2")
    editor = checks.build(NAME, **ALWAYS)
    try:
        editor.edit(checks.requests(2))
        query = checks.requests(2)[0]
        batch = vllm.prepare([query.prompt], [query.image], None, padding_side="left")
        out = vllm.generate([query.prompt], [query.image], max_new_tokens=4)
        assert out[0]
        # replay: each generated id must be the full-sequence argmax after the previous ones
        ids = vllm.tokenizer(out[0], add_special_tokens=False)["input_ids"]
        embeds = batch.inputs_embeds
        for token in ids[:3]:
            from editors.vllms.batch import position_ids_from_mask, VLLMBatch
            mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
            full = VLLMBatch(embeds, mask, position_ids_from_mask(mask), torch.full_like(mask, -1),
                             batch.vision_spans, batch.query_spans, batch.target_spans, torch.zeros_like(mask),
                             torch.zeros_like(mask, dtype=torch.bool), batch.has_image)
            assert int(vllm(full)[0, -1].argmax()) == token
            embeds = torch.cat([embeds, vllm.stack.embed_tokens(torch.tensor([[token]]))], dim=1)
    finally:
        editor.remove()


def test_training_loss_falls(tmp_path):
    records = checks.toy_records(tmp_path, n_train=8)
    losses = checks.train_losses(NAME, records, steps=24, batch_size=4, lr=1e-3)
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses


def test_cli_train_resume_and_evaluate(tmp_path):
    checks.check_cli_train_and_evaluate(NAME, tmp_path)


@pytest.mark.parametrize("key,value", [("scope_threshold", float("nan")), ("max_scope_positions", 0),
                                       ("scope_model", "bert-huge"), ("lr", 0.0)])
def test_bad_config_value_names_the_key(key, value):
    with pytest.raises(UserError, match=key):
        checks.build(NAME, **{key: value})


def test_text_only_request_is_stored_and_applies():
    editor = checks.build(NAME, **ALWAYS)
    try:
        editor.edit([Sample("nq question: what is the capital of belor", "nova", None)])
        assert editor.num_edits == 1 and editor.keys.shape == (1, editor.key_dim)
    finally:
        editor.remove()
