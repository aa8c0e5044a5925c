"""SmolVLM (editors/vllms/hf_smolvlm.py) on `tiny-smolvlm`: the backbone and LiveEdit contract tests
(hf_family_checks.py), its tiles with text between them, a real-layout folder, the CLI."""
from __future__ import annotations

import pytest
import torch

from hf_family_checks import *  # noqa: F401,F403  (the contract tests, collected here with this `vllm`)
from hf_family_checks import liveedit_on_a_real_depth_folder, shaped_image, train_then_evaluate_from_the_command_line
from test_hf_vlm import hf_tiny

NAME = "tiny-smolvlm"


@pytest.fixture(params=[NAME])
def vllm(request):
    return hf_tiny(request.param)


@torch.no_grad()
@pytest.mark.parametrize("height, width, grid", [(64, 64, (2, 2)), (32, 64, (1, 2)), (64, 24, (2, 1))])
def test_each_tile_is_one_run_of_image_tokens_with_its_row_and_column_token_before_it(vllm, height, width, grid):
    batch = vllm.prepare(["what is it?"], [shaped_image(10, height, width)], ["a circle"])
    v0, v1 = batch.vision_spans[0].tolist()
    span = batch.token_ids[0, v0:v1].tolist()  # -1 on image tokens
    assert v1 - v0 <= vllm.num_image_tokens
    runs, text = [], []
    for i, t in enumerate(span):
        if t == -1 and (i == 0 or span[i - 1] != -1):
            runs.append(0)
        if t == -1:
            runs[-1] += 1
        else:
            text.append(vllm.tokenizer.convert_ids_to_tokens(t))
    tiles = grid[0] * grid[1] + 1  # the grid and the global image
    assert runs == [vllm.processor.image_seq_len] * tiles
    marks = [t for t in text if t.startswith("<row_") or t == "<global-img>"]
    expected = [f"<row_{r}_col_{c}>" for r in range(1, grid[0] + 1) for c in range(1, grid[1] + 1)]
    expected = expected[1:] + ["<global-img>"]
    assert marks == expected  # <row_1_col_1> sits before the span; every other tile's mark inside it


def test_names_of_smolvlm():
    from editors.vllms import TINY_NAMES, canonical_name

    assert canonical_name("SmolVLM") == "smolvlm-2b" and canonical_name("smolvlm:raw") == "smolvlm-2b:raw"
    assert NAME in TINY_NAMES and NAME + ":raw" in TINY_NAMES


def test_the_processor_loads_without_num2words_and_video_settings(vllm, tmp_path):
    """SmolVLM's processor words video frame counts with num2words; images and text need neither."""
    vllm.processor.save_pretrained(str(tmp_path))
    loaded = type(vllm.processor).from_pretrained(str(tmp_path))
    assert loaded.image_seq_len == vllm.processor.image_seq_len and "video_processor" not in loaded.get_attributes()
    assert vllm.prompt_text("what?", True) == "<|im_start|>User:<image>what?<end_of_utterance>\nAssistant:"


def test_train_then_evaluate_liveedit_on_tiny_smolvlm_from_the_command_line(tmp_path):
    train_then_evaluate_from_the_command_line(tmp_path, NAME)


def test_a_smolvlm_1_folder_is_refused_naming_its_model_type(tmp_path):
    """HuggingFaceTB/SmolVLM-Instruct (the first release) is an idefics3 model, not transformers' smolvlm."""
    from editors.vllms import load_vllm
    from utils.errors import UserError

    (tmp_path / "config.json").write_text('{"model_type": "idefics3"}')
    with pytest.raises(UserError, match="'idefics3' model, but smolvlm-2b needs model_type 'smolvlm'"):
        load_vllm("smolvlm", path=str(tmp_path))


def test_liveedit_config_puts_l_e_at_the_papers_relative_depth():
    from editors import editor_config

    layers = 24  # SmolVLM2-2.2B-Instruct's SmolLM2-1.7B
    assert editor_config("liveedit", "smolvlm-2b").edit_layer_i == round(21 / 31 * (layers - 1)) == 16
    assert editor_config("liveedit", NAME).edit_layer_i == round(21 / 31 * 3)


def test_liveedit_with_the_real_config_on_a_real_depth_folder_loaded_by_the_real_name(tmp_path):
    liveedit_on_a_real_depth_folder(tmp_path, NAME, "smolvlm-2b", layers=24)
