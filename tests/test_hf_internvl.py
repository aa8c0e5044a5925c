"""InternVL3 (editors/vllms/hf_internvl.py) on tiny-internvl: the backbone and LiveEdit contract tests of
test_backbones.py / test_liveedit.py / test_hf_vlm.py collected again with this module's `vllm`, the tiling
(token counts by aspect ratio, the `<img>...</img>` run), the real-layout folder and the issue's CLI runs."""
from __future__ import annotations


import pytest
import torch

from editors.vllms import canonical_name
from hf_family_checks import (liveedit_at_the_real_depth, refuses_a_processor_that_disagrees_with_the_model,
                              shaped_image, train_then_evaluate_from_the_command_line)
from test_backbones import (test_generate_with_left_padding_matches_single_rows,  # noqa: F401
                            test_rows_of_a_batch_equal_the_batch_of_those_rows, test_rows_of_a_padded_batch_match_single_rows)
from test_hf_vlm import (hf_tiny, plain_inputs,  # noqa: F401
                         test_a_saved_folder_loads_in_the_mode_the_name_asks_for,
                         test_edits_of_images_with_different_token_counts_route_like_single_rows,
                         test_folder_without_processor_files_is_refused,
                         test_generate_with_the_kv_cache_equals_full_forwards_under_edits,
                         test_labels_select_exactly_the_target_tokens_and_the_query_holds_the_prompt,
                         test_logits_equal_plain_transformers_on_the_processors_inputs,
                         test_prototype_length_is_its_own_and_unchanged_on_the_paper_backbones,
                         test_raw_mode_has_no_template_and_its_own_name,
                         test_real_layout_folder_loads_with_the_logits_of_plain_transformers,
                         test_rows_with_different_vision_token_counts_match_single_rows,
                         test_saved_tiny_loads_back_with_identical_logits)
from test_liveedit import (editor, test_batched_edit_equals_one_by_one,  # noqa: F401
                           test_edit_changes_routed_rows_and_restore_is_bit_identical,
                           test_no_edits_gives_bit_identical_logits, test_repository_save_load_round_trip,
                           test_routed_batch_of_8_equals_8_single_inferences, test_text_only_rows_are_untouched,
                           test_training_logits_equal_hooked_inference_logits_for_a_selected_expert)

NAME = "tiny-internvl"


@pytest.fixture
def vllm():
    return hf_tiny(NAME)


def aspect_images():
    """Square (1 tile), 2:1 (2 tiles + thumbnail) and 4:1 (4 tiles + thumbnail) images."""
    return [shaped_image(1, 40, 40), shaped_image(2, 32, 64), shaped_image(3, 30, 120)]


@torch.no_grad()
def test_tiles_set_the_token_count_and_the_span_is_the_context_run_inside_img_tags(vllm):
    images = aspect_images() + [None]
    batch = vllm.prepare(["what color is the shape?"] * 4, images, ["red"] * 4)
    counts = [int(v1 - v0) for v0, v1 in batch.vision_spans.tolist()]
    per_tile = vllm.processor.image_seq_length
    assert counts == [per_tile, 3 * per_tile, 5 * per_tile, 0] and counts[2] == vllm.num_image_tokens
    tok = vllm.tokenizer
    for row in range(3):
        v0, v1 = batch.vision_spans[row].tolist()
        ids = plain_inputs(vllm, "what color is the shape?", "red", images[row])["input_ids"][0]
        assert (ids == vllm.image_token_id).nonzero().flatten().tolist() == list(range(v0, v1))
        assert ids[v0 - 1] == tok.start_image_token_id and ids[v1] == tok.end_image_token_id
        assert (batch.token_ids[row, v0:v1] == -1).all()


@torch.no_grad()
def test_tiled_images_in_one_batch_match_plain_transformers_row_by_row(vllm):
    images = aspect_images()
    prompts, targets = ["what color?", "how many shapes are there?", "what is it?"], ["red", "two", "a circle"]
    logits = vllm(vllm.prepare(prompts, images, targets))
    for row in range(3):
        theirs = vllm.model(**plain_inputs(vllm, prompts[row], targets[row], images[row])).logits[0]  # [n, V]
        torch.testing.assert_close(logits[row, :len(theirs)], theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_stop_after_layer_and_resume_match_the_full_forward(vllm, layer):
    batch = vllm.prepare(["what color?", "how many?", "what is it?"], aspect_images()[:2] + [None], ["red", "two", "x"])
    out = vllm.stack.inner(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, output_hidden_states=True)
    hidden = vllm.hidden_at_layer(batch, layer)
    assert torch.equal(hidden, out.hidden_states[layer + 1])
    torch.testing.assert_close(vllm.logits_from_layer(batch, hidden, layer), vllm(batch), atol=1e-6, rtol=1e-6)


def test_a_folder_whose_processor_disagrees_with_the_model_on_tokens_per_tile_is_refused(vllm, tmp_path):
    refuses_a_processor_that_disagrees_with_the_model(vllm, tmp_path, "internvl", "tile")


def test_names_and_the_folder_check():
    assert canonical_name("InternVL") == canonical_name("internvl3-8b") == "internvl3-8b"
    assert canonical_name("internvl:raw") == "internvl3-8b:raw"
    assert canonical_name("tiny-internvl:raw") == "tiny-internvl:raw"


def test_the_real_config_puts_l_e_at_the_papers_depth_of_the_real_model(tmp_path):
    assert liveedit_at_the_real_depth(tmp_path, "internvl3-8b", NAME, layers=28) == 18


def test_train_then_evaluate_liveedit_on_tiny_internvl_from_the_command_line(tmp_path):
    train_then_evaluate_from_the_command_line(tmp_path, NAME)
