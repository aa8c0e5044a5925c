"""Contract checks of one processor-driven family (editors/vllms/hf_<family>.py), written once for any
layout: a family's test file (tests/test_hf_<family>.py) imports them with its own `vllm` fixture.

Besides test_hf_vlm.py's layout-free checks (imported below), these hold for families whose vision span
is several image-token runs with text between them (SmolVLM's tiles) or one run with 1-D positions
(LLaVA-OneVision): the span is where the processor put the image tokens, images of other aspect ratios
become other token counts (tile counts), and rows of a batch with different tile counts equal single rows.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from conftest import ROOT
from test_backbones import PROMPTS, TARGETS  # noqa: F401
from test_hf_vlm import plain_inputs

# the backbone contract (test_backbones.py), LiveEdit's (test_liveedit.py) and the processor-driven ones
# of test_hf_vlm.py that hold for every layout; a family's test file imports them from here
from test_backbones import (test_generate_with_left_padding_matches_single_rows,  # noqa: F401
                            test_rows_of_a_batch_equal_the_batch_of_those_rows, test_rows_of_a_padded_batch_match_single_rows)
from test_liveedit import (batch_of, editor, force_routing, requests,  # noqa: F401
                           test_batched_edit_equals_one_by_one, test_edit_changes_routed_rows_and_restore_is_bit_identical,
                           test_no_edits_gives_bit_identical_logits, test_repository_save_load_round_trip,
                           test_routed_batch_of_8_equals_8_single_inferences, test_text_only_rows_are_untouched,
                           test_training_logits_equal_hooked_inference_logits_for_a_selected_expert)
from test_hf_vlm import (test_a_saved_folder_loads_in_the_mode_the_name_asks_for,  # noqa: F401
                         test_edits_of_images_with_different_token_counts_route_like_single_rows,
                         test_folder_without_processor_files_is_refused,
                         test_generate_with_the_kv_cache_equals_full_forwards_under_edits,
                         test_logits_equal_plain_transformers_on_the_processors_inputs,
                         test_prototype_length_is_its_own_and_unchanged_on_the_paper_backbones,
                         test_raw_mode_has_no_template_and_its_own_name,
                         test_real_layout_folder_loads_with_the_logits_of_plain_transformers,
                         test_rows_with_different_vision_token_counts_match_single_rows,
                         test_saved_tiny_loads_back_with_identical_logits)


def shaped_image(seed: int, height: int, width: int) -> Image.Image:
    """A random RGB image of `height` x `width` pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def aspect_images():
    """Square, wide and tall images: different grids of tiles on LLaVA-OneVision and SmolVLM."""
    return [shaped_image(1, 64, 64), shaped_image(2, 32, 64), shaped_image(3, 64, 24)]


@torch.no_grad()
def test_labels_select_the_target_and_the_query_ends_with_the_templates_assistant_header(vllm):
    images = [aspect_images()[0], aspect_images()[1], None]
    batch = vllm.prepare(PROMPTS, images, TARGETS)
    tok = vllm.tokenizer
    for row, target in enumerate(TARGETS):
        t0, t1 = batch.target_spans[row].tolist()
        target_ids = batch.token_ids[row, t0:t1].tolist()
        assert tok.decode(target_ids).strip() == target
        assert batch.labels[row, batch.label_mask[row]].tolist() == target_ids
        q0, q1 = batch.query_spans[row].tolist()
        assert q1 == t0 and q0 == (batch.vision_spans[row, 1] if images[row] is not None else 0)
        head = vllm.prompt_text(PROMPTS[row], images[row] is not None)
        header = head[head.index(PROMPTS[row]) + len(PROMPTS[row]):]  # e.g. "<|im_end|>\n<|im_start|>assistant\n"
        query = tok.decode(batch.token_ids[row, q0:q1])
        assert PROMPTS[row] in query and query.endswith(header), (query, header)


@torch.no_grad()
def test_vision_span_runs_from_the_first_to_the_last_image_token_the_processor_wrote(vllm):
    images = aspect_images()
    batch = vllm.prepare(["what color is the shape?"] * 3, images, ["red"] * 3)
    counts = []
    for row, image in enumerate(images):
        v0, v1 = batch.vision_spans[row].tolist()
        ids = plain_inputs(vllm, "what color is the shape?", "red", image)["input_ids"][0]
        image_at = (ids == vllm.image_token_id).nonzero().flatten().tolist()
        assert (image_at[0], image_at[-1] + 1) == (v0, v1)
        assert (batch.token_ids[row, image_at] == -1).all()  # image positions hold features, not ids
        between = [i for i in range(v0, v1) if i not in set(image_at)]  # text between the tiles (SmolVLM)
        assert batch.token_ids[row, between].tolist() == ids[between].tolist()
        counts.append(len(image_at))
    assert counts[0] > counts[1] and max(counts) <= vllm.num_image_tokens  # a 2x2 grid has more than a 1x2 grid


@torch.no_grad()
def test_rows_with_different_tile_counts_match_single_rows(vllm):
    images = aspect_images() + [None]
    prompts = ["what color?", "how many shapes are there?", "what is it?", "a text-only row"]
    targets = ["red", "two", "a circle", "x"]
    logits = vllm(vllm.prepare(prompts, images, targets))
    for row in range(4):
        single = vllm.prepare([prompts[row]], [images[row]], [targets[row]])
        torch.testing.assert_close(vllm(single)[0], logits[row, :single.length], atol=1e-5, rtol=1e-5)
        theirs = vllm.model(**plain_inputs(vllm, prompts[row], targets[row], images[row])).logits
        torch.testing.assert_close(vllm(single), theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_stop_after_layer_and_resume_match_the_full_forward(vllm):
    batch = vllm.prepare(PROMPTS, aspect_images()[:2] + [None], TARGETS)
    out = vllm.stack.inner(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, output_hidden_states=True)
    for layer in range(vllm.num_layers - 1):
        hidden = vllm.hidden_at_layer(batch, layer)
        assert torch.equal(hidden, out.hidden_states[layer + 1])
        torch.testing.assert_close(vllm.logits_from_layer(batch, hidden, layer), vllm(batch), atol=1e-6, rtol=1e-6)


def train_then_evaluate_from_the_command_line(tmp_path, name: str) -> None:
    """The issue's two commands on a tiny toy world: 2 training steps of LiveEdit on backbone `name`,
    then 2 sequential edits over 4 records with that checkpoint; both exit 0 without a traceback."""
    from toyworld.world import generate_toyworld

    generate_toyworld(str(tmp_path / "data" / "toyworld"), n_train=8, n_eval=4, n_pretrain_scenes=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    common = ["--data_dir", str(tmp_path / "data")]
    train = subprocess.run([sys.executable, os.path.join(ROOT, "train_vllm_editor.py"), "-en", "liveedit", "-mn", name,
                            "-dna", "TOY", "-bs", "2", "--max_steps", "2", "--records_dir", str(tmp_path / "records"),
                            *common], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0 and "Traceback" not in train.stderr, train.stderr[-2000:]
    (checkpoint,) = glob.glob(str(tmp_path / "records" / "liveedit" / name / "*" / "checkpoints" / "step-2"))
    evaluate = subprocess.run([sys.executable, os.path.join(ROOT, "test_vllm_edit.py"), "-en", "liveedit", "-mn", name,
                               "-dn", "TOY", "-sen", "2", "-dsn", "4", "-ckpt", checkpoint,
                               "--results_dir", str(tmp_path / "results"), "--no_progress", *common],
                              cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0 and "Traceback" not in evaluate.stderr, evaluate.stderr[-2000:]
    (results,) = glob.glob(str(tmp_path / "results" / "liveedit" / name / "TOY" / "*" / "results.json"))
    assert os.path.getsize(results) > 0


@torch.no_grad()
def liveedit_on_a_real_depth_folder(tmp_path, tiny, real_name: str) -> None:
    """LiveEdit with the real backbone's config (configs/liveedit/<real_name>.yaml: its l_e, module
    width, prototype length) on `tiny`, a tiny backbone of the real depth, saved in the real layout
    (save_pretrained of model and processor) and loaded by the real name: an edit routes and changes
    the edited row, restore gives back the unedited logits bit for bit."""
    from editors import load_editor
    from editors.vllms import load_vllm
    from test_liveedit import force_routing
    from utils.records import Sample

    layers = tiny.num_layers
    tiny.model.save_pretrained(str(tmp_path))
    tiny.processor.save_pretrained(str(tmp_path))
    vllm = load_vllm(real_name, path=str(tmp_path))
    assert vllm.name == real_name and vllm.num_layers == layers
    torch.manual_seed(0)  # an untrained editor: some seeds give an expert whose ReLU(U LN(h)) is all zero here
    editor = load_editor("liveedit", vllm)
    try:
        assert editor.config.edit_layer_i == round(21 / 31 * (layers - 1))
        force_routing(editor)
        sample = Sample("what color is the shape?", "dark green", shaped_image(5, 32, 64))
        batch = vllm.prepare([sample.prompt], [sample.image], [sample.target])
        before = vllm(batch)
        editor.edit([sample])
        assert not torch.equal(vllm(batch), before)
        editor.restore()
        assert torch.equal(vllm(batch), before)
    finally:
        editor.remove()


def liveedit_at_the_real_depth(tmp_path, real: str, tiny: str, layers: int) -> int:
    """Build LiveEdit with `configs/liveedit/<real>.yaml` on a `tiny` model of `layers` decoder layers saved in
    the real layout (save_pretrained of model and processor) and loaded as `real`; returns its l_e, checked
    to be the paper's relative depth (21 of 32 layers)."""
    from editors import load_editor
    from editors.vllms import TinySpec, load_vllm
    from editors.vllms.tiny_vlm import build_tiny_vlm

    small = build_tiny_vlm(tiny, TinySpec(num_layers=layers, hidden_size=32, vision_hidden_size=32, vision_layers=1))
    small.model.save_pretrained(str(tmp_path))
    small.processor.save_pretrained(str(tmp_path))
    vllm = load_vllm(real, path=str(tmp_path))
    editor = load_editor("liveedit", vllm)
    try:
        assert vllm.name == real and vllm.num_layers == layers
        assert editor.config.edit_layer_i == round(21 / 31 * (layers - 1))
        return editor.config.edit_layer_i
    finally:
        editor.remove()


def refuses_a_processor_that_disagrees_with_the_model(vllm, tmp_path, name: str, per: str) -> None:
    """A real-layout folder whose processor_config.json says another image_seq_length than the model makes
    (per tile or per image) is one UserError naming the file, both numbers and `per`."""
    import json

    import pytest

    from editors.vllms import load_vllm
    from utils.errors import UserError

    vllm.model.save_pretrained(str(tmp_path))
    vllm.processor.save_pretrained(str(tmp_path))
    config = tmp_path / "processor_config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), image_seq_length=20)))
    with pytest.raises(UserError, match=r"processor_config.json: image_seq_length is 20 but the model .* makes "
                                        r"{} tokens per {}".format(vllm.processor.image_seq_length, per)):
        load_vllm(name, path=str(tmp_path))
