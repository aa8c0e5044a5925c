"""SmolVLM (editors/vllms/hf_smolvlm.py) on `tiny-smolvlm`: the backbone and LiveEdit contract tests
(hf_family_checks.py), its tiles with text between them, a real-layout folder, the CLI."""
from __future__ import annotations

import pytest
import torch

from hf_family_checks import *  # noqa: F401,F403  (the contract tests, collected here with this `vllm`)
from hf_family_checks import liveedit_on_a_real_depth_folder, shaped_image, train_then_evaluate_from_the_command_line
from editors.vllms import TinySpec, load_vllm
from editors.vllms.tiny_smolvlm import build
from test_hf_vlm import hf_tiny, plain_inputs

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
    assert canonical_name("SmolVLM2") == "smolvlm2-2b" and canonical_name("smolvlm2-2b:raw") == "smolvlm2-2b:raw"
    assert NAME in TINY_NAMES and NAME + ":raw" in TINY_NAMES


def test_the_processor_loads_without_num2words_and_video_settings(vllm, tmp_path):
    """SmolVLM's processor words video frame counts with num2words; images and text need neither."""
    vllm.processor.save_pretrained(str(tmp_path))
    loaded = type(vllm.processor).from_pretrained(str(tmp_path))
    assert loaded.image_seq_len == vllm.processor.image_seq_len and "video_processor" not in loaded.get_attributes()
    assert vllm.prompt_text("what?", True) == "<|im_start|>User:<image>what?<end_of_utterance>\nAssistant:"


def test_train_then_evaluate_liveedit_on_tiny_smolvlm_from_the_command_line(tmp_path):
    train_then_evaluate_from_the_command_line(tmp_path, NAME)


@pytest.mark.parametrize("found, name, needed", [("idefics3", "smolvlm2", "smolvlm2-2b needs model_type 'smolvlm'"),
                                                  ("smolvlm", "smolvlm", "smolvlm-2b needs model_type 'idefics3'")])
def test_a_folder_of_the_other_release_is_refused_naming_both_model_types(tmp_path, found, name, needed):
    """SmolVLM-Instruct (the first release) is an idefics3 model, SmolVLM2 transformers' smolvlm."""
    from utils.errors import UserError

    (tmp_path / "config.json").write_text(f'{{"model_type": "{found}"}}')
    with pytest.raises(UserError, match=f"'{found}' model, but {needed}"):
        load_vllm(name, path=str(tmp_path))


def test_liveedit_config_puts_l_e_at_the_papers_relative_depth():
    from editors import editor_config

    layers = 24  # SmolLM2-1.7B, the LM of both releases
    for real in ("smolvlm-2b", "smolvlm2-2b"):
        assert editor_config("liveedit", real).edit_layer_i == round(21 / 31 * (layers - 1)) == 16
    assert editor_config("liveedit", NAME).edit_layer_i == round(21 / 31 * 3)


@pytest.mark.parametrize("real_name", ["smolvlm2-2b", "smolvlm-2b"])
def test_liveedit_with_the_real_config_on_a_real_depth_folder_loaded_by_the_real_name(tmp_path, real_name):
    spec = TinySpec(num_layers=24, hidden_size=32, vision_layers=1)  # SmolLM2-1.7B's depth
    liveedit_on_a_real_depth_folder(tmp_path, build(spec, "chat", first_release=real_name == "smolvlm-2b"), real_name)


@torch.no_grad()
def test_the_first_release_in_idefics3_classes_loads_as_smolvlm_with_the_logits_of_plain_transformers(tmp_path):
    """SmolVLM-Instruct (HuggingFaceTB, model_type idefics3): the same layout in Idefics3's classes."""
    first = build(TinySpec(), "chat", first_release=True)
    first.model.save_pretrained(str(tmp_path))
    first.processor.save_pretrained(str(tmp_path))
    loaded = load_vllm("smolvlm", path=str(tmp_path))
    assert loaded.name == "smolvlm-2b" and loaded.model_type == "idefics3"
    plain = type(first.model).from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompts, targets = ["what color?", "how many?", "a text-only row"], ["red", "two", "x"]
    images = [shaped_image(1, 64, 64), shaped_image(2, 32, 64), None]  # 5 tiles, 3 tiles, none
    logits = loaded(loaded.prepare(prompts, images, targets))
    for row in range(3):
        single = loaded.prepare([prompts[row]], [images[row]], [targets[row]])
        theirs = plain(**plain_inputs(loaded, prompts[row], targets[row], images[row])).logits
        torch.testing.assert_close(loaded(single), theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(single)[0], logits[row, :single.length], atol=1e-5, rtol=1e-5)
