"""Gemma 3 (editors/vllms/hf_gemma3.py) on tiny-gemma3: the backbone and LiveEdit contract tests of
test_backbones.py / test_liveedit.py / test_hf_vlm.py collected again with this module's `vllm`, the
bidirectional attention over an image's soft tokens (equal to plain transformers' forward with the
processor's token_type_ids, and different from a causal-only pass), BOS once in chat mode, the
real-layout folder and the issue's CLI runs."""
from __future__ import annotations


import pytest
import torch

from conftest import make_image
from editors.vllms import canonical_name
from editors.vllms.batch import with_prefix
from hf_family_checks import (liveedit_at_the_real_depth, refuses_a_processor_that_disagrees_with_the_model,
                              train_then_evaluate_from_the_command_line)
from test_backbones import (PROMPTS, TARGETS, test_generate_with_left_padding_matches_single_rows,  # noqa: F401
                            test_rows_of_a_batch_equal_the_batch_of_those_rows, test_rows_of_a_padded_batch_match_single_rows)
from test_hf_vlm import (hf_tiny, plain_inputs,  # noqa: F401
                         test_a_saved_folder_loads_in_the_mode_the_name_asks_for,
                         test_edits_of_images_with_different_token_counts_route_like_single_rows,
                         test_folder_without_processor_files_is_refused,
                         test_generate_with_the_kv_cache_equals_full_forwards_under_edits,
                         test_logits_equal_plain_transformers_on_the_processors_inputs,
                         test_prototype_length_is_its_own_and_unchanged_on_the_paper_backbones,
                         test_real_layout_folder_loads_with_the_logits_of_plain_transformers,
                         test_rows_with_different_vision_token_counts_match_single_rows,
                         test_saved_tiny_loads_back_with_identical_logits)
from test_liveedit import (editor, test_batched_edit_equals_one_by_one,  # noqa: F401
                           test_edit_changes_routed_rows_and_restore_is_bit_identical,
                           test_no_edits_gives_bit_identical_logits, test_repository_save_load_round_trip,
                           test_routed_batch_of_8_equals_8_single_inferences, test_text_only_rows_are_untouched,
                           test_training_logits_equal_hooked_inference_logits_for_a_selected_expert)

NAME = "tiny-gemma3"


@pytest.fixture
def vllm():
    return hf_tiny(NAME)


@torch.no_grad()
def test_image_tokens_attend_both_ways_like_plain_transformers_and_unlike_a_causal_pass(vllm):
    image = make_image(4, 48)
    inputs = plain_inputs(vllm, PROMPTS[0], TARGETS[0], image)
    assert int(inputs["token_type_ids"].sum()) == vllm.num_image_tokens  # the processor marks the soft tokens
    batch = vllm.prepare([PROMPTS[0]], [image], [TARGETS[0]])
    v0, v1 = batch.vision_spans[0].tolist()
    assert batch.image_blocks[0, v0:v1].eq(0).all() and (batch.image_blocks[0, :v0] == -1).all()
    assert (batch.image_blocks[0, v1:] == -1).all()
    ours = vllm(batch)
    torch.testing.assert_close(ours, vllm.model(**inputs).logits, atol=1e-5, rtol=1e-5)
    causal = dict(inputs)
    causal.pop("token_type_ids")  # transformers' causal-only path (what generation uses after the prefill)
    theirs_causal = vllm.model(**causal).logits
    assert (ours[0, v0:v1] - theirs_causal[0, v0:v1]).abs().max() > 1e-3  # the first soft token sees the last
    torch.testing.assert_close(ours[0, :v0], theirs_causal[0, :v0], atol=1e-5, rtol=1e-5)  # text before: causal


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_stop_after_layer_and_resume_match_the_full_forward(vllm, layer):
    image = make_image(5, 40)
    inputs = plain_inputs(vllm, PROMPTS[1], TARGETS[1], image)
    plain = vllm.model(**inputs, output_hidden_states=True).hidden_states  # embeddings, then each layer
    single = vllm.prepare([PROMPTS[1]], [image], [TARGETS[1]])
    assert torch.equal(vllm.hidden_at_layer(single, layer), plain[layer + 1])
    batch = vllm.prepare(PROMPTS, [make_image(1), image, None], TARGETS)  # padded, mixed image / text rows
    hidden = vllm.hidden_at_layer(batch, layer)
    torch.testing.assert_close(vllm.logits_from_layer(batch, hidden, layer), vllm(batch), atol=1e-6, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["chat", "raw"])
def test_labels_select_the_target_and_the_query_holds_the_prompt(vllm, mode):
    vllm = vllm if mode == "chat" else hf_tiny(NAME + ":raw")
    batch = vllm.prepare(PROMPTS, [make_image(1), make_image(2, 48), None], TARGETS)
    tok = vllm.tokenizer
    for row, target in enumerate(TARGETS):
        t0, t1 = batch.target_spans[row].tolist()
        assert tok.decode(batch.token_ids[row, t0:t1]).strip() == target
        assert batch.label_mask[row].nonzero().flatten().tolist() == list(range(t0 - 1, t1 - 1))
        q0, q1 = batch.query_spans[row].tolist()
        query = tok.decode(batch.token_ids[row, q0:q1])
        assert PROMPTS[row].strip() in query
        assert query.rstrip().endswith("model") if mode == "chat" else query.strip().endswith(PROMPTS[row].strip())


@torch.no_grad()
def test_chat_rows_start_with_one_bos_and_raw_rows_have_no_template(vllm):
    tok, raw = vllm.tokenizer, hf_tiny(NAME + ":raw")
    assert vllm.prompt_text("what color?", True).startswith("<start_of_turn>user\n<start_of_image>")
    for v in (vllm, raw):
        batch = v.prepare(["what color?", "what color?"], [make_image(1), None], ["red", "red"])
        for row in range(2):
            ids = batch.token_ids[row][batch.attention_mask[row].bool()].tolist()
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    text = raw.tokenizer.decode(raw.prepare(["what color?"], [make_image(1)], ["red"]).token_ids[0].clamp(min=0))
    assert "<start_of_turn>" not in text and text.endswith("what color? red")


@torch.no_grad()
def test_a_prefixed_batch_keeps_each_image_block_on_its_tokens(vllm):
    batch = vllm.prepare(PROMPTS, [make_image(1), None, make_image(3)], TARGETS)
    prefixes = [torch.zeros(2, vllm.hidden_size), torch.zeros(3, vllm.hidden_size), None]
    for side in ("right", "left"):
        moved = with_prefix(batch, prefixes, side)
        for row in (0, 2):
            v0, v1 = moved.vision_spans[row].tolist()
            assert (moved.image_blocks[row, v0:v1] == 0).all()
            assert int((moved.image_blocks[row] >= 0).sum()) == vllm.num_image_tokens
        assert (moved.image_blocks[1] == -1).all()


def test_a_folder_whose_processor_disagrees_with_the_model_on_tokens_per_image_is_refused(vllm, tmp_path):
    refuses_a_processor_that_disagrees_with_the_model(vllm, tmp_path, "gemma3", "image")


def test_names_and_the_fixed_prototype():
    assert canonical_name("Gemma3") == canonical_name("gemma3-4b") == "gemma3-4b"
    assert canonical_name("gemma3:raw") == "gemma3-4b:raw"
    assert hf_tiny(NAME).prototype_tokens == hf_tiny(NAME).num_image_tokens == 16


def test_the_real_config_puts_l_e_at_the_papers_depth_of_the_real_model(tmp_path):
    assert liveedit_at_the_real_depth(tmp_path, "gemma3-4b", NAME, layers=34) == 22


def test_train_then_evaluate_liveedit_on_tiny_gemma3_from_the_command_line(tmp_path):
    train_then_evaluate_from_the_command_line(tmp_path, NAME)
