"""LLaVA-OneVision (editors/vllms/hf_llava_onevision.py) on `tiny-llava-onevision`: the backbone and
LiveEdit contract tests (hf_family_checks.py), its anyres layout, a real-layout folder, the CLI."""
from __future__ import annotations

import pytest
import torch

from hf_family_checks import *  # noqa: F401,F403  (the contract tests, collected here with this `vllm`)
from hf_family_checks import liveedit_on_a_real_depth_folder, shaped_image, train_then_evaluate_from_the_command_line
from test_hf_vlm import hf_tiny, plain_inputs

NAME = "tiny-llava-onevision"


@pytest.fixture(params=[NAME])
def vllm(request):
    return hf_tiny(request.param)


@torch.no_grad()
@pytest.mark.parametrize("height, width, grid",
                         [(32, 32, (1, 1)), (32, 64, (1, 2)), (64, 32, (2, 1)), (48, 48, (2, 2))])
def test_image_tokens_are_the_base_tile_then_the_grid_with_a_newline_vector_after_each_row(vllm, height, width, grid):
    image = shaped_image(10, height, width)
    batch = vllm.prepare(["what is it?"], [image], ["a circle"])
    v0, v1 = batch.vision_spans[0].tolist()
    side = vllm.model.config.vision_config.image_size // vllm.model.config.vision_config.patch_size  # tile: side x side
    rows, cols = grid[0] * side, grid[1] * side  # grid features (the image fills its grid: no unpadding here)
    assert v1 - v0 == side * side + rows * (cols + 1)
    newline = vllm.model.model.image_newline  # [d]
    grid_part = batch.inputs_embeds[0, v0 + side * side:v1].reshape(rows, cols + 1, -1)
    assert torch.equal(grid_part[:, -1], newline.expand(rows, -1))  # the last position of every grid row
    assert not (grid_part[:, :-1] == newline).all(-1).any()
    assert v1 - v0 == len((plain_inputs(vllm, "what is it?", "a circle", image)["input_ids"][0]
                           == vllm.image_token_id).nonzero())


def test_the_largest_grid_is_the_image_token_budget(vllm):
    assert vllm.num_image_tokens == 16 + 8 * 9  # base tile + the 2x2 grid's 8x8 features and 8 newlines
    assert vllm.prototype_tokens == min(vllm.num_image_tokens, vllm.max_prototype_tokens)
    big = vllm.prepare(["x"], [shaped_image(11, 200, 200)], ["y"]).vision_spans[0]
    assert int(big[1] - big[0]) == vllm.num_image_tokens


def test_names_of_llava_onevision():
    from editors.vllms import TINY_NAMES, canonical_name

    assert canonical_name("LLaVA-OneVision") == "llava-onevision-7b"
    assert canonical_name("llava-onevision:raw") == "llava-onevision-7b:raw"
    assert NAME in TINY_NAMES and NAME + ":raw" in TINY_NAMES


def test_train_then_evaluate_liveedit_on_tiny_llava_onevision_from_the_command_line(tmp_path):
    train_then_evaluate_from_the_command_line(tmp_path, NAME)


def test_the_processors_settings_survive_save_pretrained(vllm, tmp_path):
    """num_image_tokens and the feature strategy are processor settings: a folder without them cannot
    count an image's tokens (image_only used to hide them from save_pretrained / from_pretrained)."""
    vllm.processor.save_pretrained(str(tmp_path))
    loaded = type(vllm.processor).from_pretrained(str(tmp_path))
    for key in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"):
        assert getattr(loaded, key) == getattr(vllm.processor, key), key
    assert "video_processor" not in loaded.get_attributes()


def test_liveedit_config_puts_l_e_at_the_papers_relative_depth():
    from editors import editor_config

    layers = 28  # llava-onevision-qwen2-7b-ov's Qwen2-7B
    assert editor_config("liveedit", "llava-onevision-7b").edit_layer_i == round(21 / 31 * (layers - 1)) == 18
    assert editor_config("liveedit", NAME).edit_layer_i == round(21 / 31 * 3)


def test_liveedit_with_the_real_config_on_a_real_depth_folder_loaded_by_the_real_name(tmp_path):
    from editors.vllms import TinySpec
    from editors.vllms.tiny_vlm import build_tiny_vlm

    real_depth = build_tiny_vlm(NAME, TinySpec(num_layers=28, hidden_size=32, vision_layers=1))  # Qwen2-7B's depth
    liveedit_on_a_real_depth_folder(tmp_path, real_depth, "llava-onevision-7b")
