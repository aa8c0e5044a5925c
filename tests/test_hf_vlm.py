"""Processor-driven backbones (editors/vllms/hf_vlm.py) on their tiny versions: the backbone and
LiveEdit contract tests, variable vision-token counts, M-RoPE positions, real-layout folders, the CLI."""
from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_image
from editors import load_editor
from editors.vllms import TINY_NAMES, canonical_name, load_vllm, save_vllm
from utils.errors import UserError
from utils.records import Sample

# the backbone contract (test_backbones.py) and LiveEdit's (test_liveedit.py), collected here again
# with the `vllm` fixture below: every test runs on every processor-driven tiny family
from test_backbones import (PROMPTS, TARGETS, test_generate_with_left_padding_matches_single_rows,  # noqa: F401
                            test_rows_of_a_batch_equal_the_batch_of_those_rows, test_rows_of_a_padded_batch_match_single_rows)
from test_liveedit import (batch_of, editor, force_routing, requests,  # noqa: F401
                           test_batched_edit_equals_one_by_one, test_edit_changes_routed_rows_and_restore_is_bit_identical,
                           test_no_edits_gives_bit_identical_logits, test_repository_save_load_round_trip,
                           test_routed_batch_of_8_equals_8_single_inferences, test_text_only_rows_are_untouched,
                           test_training_logits_equal_hooked_inference_logits_for_a_selected_expert)

HF_TINY = ("tiny-qwen2.5-vl", "tiny-qwen3-vl")
_CACHE: dict = {}


def hf_tiny(name: str):
    if name not in _CACHE:
        _CACHE[name] = load_vllm(name)
    return _CACHE[name]


@pytest.fixture(params=HF_TINY)
def vllm(request):
    return hf_tiny(request.param)


def varied_images():
    """Images of three sizes: 4, 8 and 16 vision tokens on the tiny Qwen2.5-VL."""
    return [make_image(1, 32), make_image(2, 48), make_image(3, 64)]


def plain_inputs(vllm, prompt: str, target: str, image):
    """What plain transformers gets for the same row: the processor's own output on the same text."""
    text = vllm.prompt_text(prompt, image is not None) + target
    return vllm.processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")


# ---- backbone -----------------------------------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("mode", ["chat", "raw"])
def test_labels_select_exactly_the_target_tokens_and_the_query_holds_the_prompt(vllm, mode):
    vllm = vllm if mode == "chat" else hf_tiny(vllm.name + ":raw")
    batch = vllm.prepare(PROMPTS, [make_image(1), make_image(2, 48), None], TARGETS)
    tok = vllm.tokenizer
    for row, target in enumerate(TARGETS):
        t0, t1 = batch.target_spans[row].tolist()
        target_ids = batch.token_ids[row, t0:t1].tolist()
        assert tok.decode(target_ids).strip() == target
        assert batch.label_mask[row].nonzero().flatten().tolist() == list(range(t0 - 1, t1 - 1))
        assert batch.labels[row, batch.label_mask[row]].tolist() == target_ids
        q0, q1 = batch.query_spans[row].tolist()
        assert q1 == t0 and q0 == batch.vision_spans[row, 1] if row < 2 else q0 == 0
        query = tok.decode(batch.token_ids[row, q0:q1])
        # chat: the query is the rest of the user turn and the assistant header; raw: the prompt
        assert PROMPTS[row] in query and (query.rstrip().endswith("assistant") if mode == "chat"
                                          else query.strip().endswith(PROMPTS[row]))


@torch.no_grad()
def test_vision_tokens_vary_with_the_image_and_spans_cover_exactly_the_image_tokens(vllm):
    images = varied_images() + [None]
    batch = vllm.prepare(["what color is the shape?"] * 4, images, ["red"] * 4)
    counts = [int(v1 - v0) for v0, v1 in batch.vision_spans.tolist()]
    assert counts[0] < counts[1] < counts[2] <= vllm.num_image_tokens and counts[3] == 0
    for row in range(3):
        v0, v1 = batch.vision_spans[row].tolist()
        ids = plain_inputs(vllm, "what color is the shape?", "red", images[row])["input_ids"][0]
        image_at = (ids == vllm.image_token_id).nonzero().flatten().tolist()
        assert image_at == list(range(v0, v1))  # one contiguous run, where the processor put it
        assert (batch.token_ids[row, v0:v1] == -1).all()


@torch.no_grad()
@pytest.mark.parametrize("size", [32, 64])
def test_logits_equal_plain_transformers_on_the_processors_inputs(vllm, size):
    image = make_image(4, size)
    ours = vllm(vllm.prepare([PROMPTS[0]], [image], [TARGETS[0]]))
    theirs = vllm.model(**plain_inputs(vllm, PROMPTS[0], TARGETS[0], image)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mrope_positions_are_the_models_own_and_padding_does_not_move_them(vllm):
    image = make_image(5, 48)
    inputs = plain_inputs(vllm, "how many?", "two", image)
    expected, _ = vllm.model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"])  # [3, 1, n]
    for side in ("right", "left"):
        batch = vllm.prepare(["how many?", PROMPTS[2] + " and more words here"], [image, None], ["two", "x"],
                             padding_side=side)
        row = batch.position_ids[0][batch.attention_mask[0].bool()]  # [n, 3]
        assert torch.equal(row, expected[:, 0].T)
    v0, v1 = batch.vision_spans[0].tolist()
    assert not torch.equal(batch.position_ids[0, v0:v1, 1], batch.position_ids[0, v0:v1, 2])  # height != width


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_stop_after_layer_and_resume_match_the_full_forward(vllm, layer):
    batch = vllm.prepare(PROMPTS, varied_images()[:2] + [None], TARGETS)
    deepstack = {}
    if batch.vision_layer_inputs is not None:  # Qwen3-VL: the model's own arguments for them
        mask, per_layer = batch.layer_inputs()["image_mask"], batch.vision_layer_inputs.unbind(2)
        deepstack = dict(visual_pos_masks=mask, deepstack_visual_embeds=[t[mask] for t in per_layer])
    out = vllm.stack.inner(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids.permute(2, 0, 1), output_hidden_states=True, **deepstack)
    hidden = vllm.hidden_at_layer(batch, layer)
    assert torch.equal(hidden, out.hidden_states[layer + 1])
    torch.testing.assert_close(vllm.logits_from_layer(batch, hidden, layer), vllm(batch), atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_rows_with_different_vision_token_counts_match_single_rows(vllm):
    images = varied_images()
    prompts = ["what color?", "how many shapes are there?", "what is it?"]
    batch = vllm.prepare(prompts, images, ["red", "two", "a circle"])
    logits = vllm(batch)
    for row in range(3):
        single = vllm.prepare([prompts[row]], [images[row]], [["red", "two", "a circle"][row]])
        torch.testing.assert_close(vllm(single)[0], logits[row, :single.length], atol=1e-5, rtol=1e-5)


def test_raw_mode_has_no_template_and_its_own_name(vllm):
    raw = load_vllm(vllm.name + ":raw")
    assert raw.name == vllm.name + ":raw" and raw.prompt_mode == "raw"
    batch = raw.prepare(["what color?"], [make_image(1)], ["red"])
    text = raw.tokenizer.decode(batch.token_ids[0][batch.token_ids[0] >= 0])
    assert "<|im_start|>" not in text and text.endswith("what color? red")
    assert "<|im_start|>" in vllm.tokenizer.decode(vllm.prepare(["what color?"], [None], ["red"]).token_ids[0])
    with pytest.raises(UserError, match="placeholder"):
        raw.prepare([f"{raw.image_placeholder} what?"], [make_image(0)], ["x"])


def test_names_of_the_processor_driven_backbones():
    assert canonical_name("Qwen2.5-VL") == "qwen2.5-vl-7b"
    assert canonical_name("qwen2.5-vl:RAW") == "qwen2.5-vl-7b:raw"
    assert "tiny-qwen2.5-vl" in TINY_NAMES and "tiny-qwen2.5-vl:raw" in TINY_NAMES
    with pytest.raises(UserError):
        canonical_name("llava:raw")  # the paper's backbones have one prompt format


@torch.no_grad()
def test_saved_tiny_loads_back_with_identical_logits(vllm, tmp_path):
    batch_args = (PROMPTS, varied_images()[:2] + [None], TARGETS)
    save_vllm(vllm, str(tmp_path))
    loaded = load_vllm(vllm.name, path=str(tmp_path))
    assert loaded.name == vllm.name
    assert torch.equal(vllm(vllm.prepare(*batch_args)), loaded(loaded.prepare(*batch_args)))


@torch.no_grad()
def test_real_layout_folder_loads_with_the_logits_of_plain_transformers(vllm, tmp_path):
    """A folder as the hub has it (save_pretrained of model and processor, no marker of ours)."""
    vllm.model.save_pretrained(str(tmp_path))
    vllm.processor.save_pretrained(str(tmp_path))
    full = canonical_name(vllm.family)
    loaded = load_vllm(vllm.family, path=str(tmp_path))
    assert loaded.name == full and loaded.source == os.path.realpath(tmp_path)
    plain = type(vllm.model).from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    image = make_image(6, 48)
    ours = loaded(loaded.prepare([PROMPTS[0]], [image], [TARGETS[0]]))
    theirs = plain(**plain_inputs(loaded, PROMPTS[0], TARGETS[0], image)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    raw = load_vllm(vllm.family + ":raw", path=str(tmp_path))
    assert raw.name == full + ":raw" and raw.prompt_mode == "raw"


def test_folder_without_processor_files_is_refused(vllm, tmp_path):
    vllm.model.save_pretrained(str(tmp_path))
    vllm.tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="processor_config.json"):
        load_vllm(vllm.family, path=str(tmp_path))


# ---- LiveEdit with variable vision-token counts ----------------------------------------------------

def test_prototype_length_is_its_own_and_unchanged_on_the_paper_backbones(vllm):
    from conftest import tiny_vllm
    from editors import editor_config

    for paper in ("tiny-blip2", "tiny-llava"):
        ed = load_editor("liveedit", tiny_vllm(paper))
        assert ed.inpt_extractor.vis_rep_prot.shape[1] == tiny_vllm(paper).num_image_tokens
        ed.remove()
    ed = load_editor("liveedit", vllm)
    assert ed.inpt_extractor.vis_rep_prot.shape[1] == vllm.prototype_tokens
    ed.remove()
    config = dataclasses.replace(editor_config("liveedit", vllm.name), vision_prototype_tokens=3)
    from editors.liveedit.editor import LiveEdit

    ed = LiveEdit(vllm, config)
    assert ed.inpt_extractor.vis_rep_prot.shape == (1, 3, vllm.hidden_size)
    ed.remove()


@torch.no_grad()
def test_edits_of_images_with_different_token_counts_route_like_single_rows(vllm, editor):
    force_routing(editor)
    sizes = (32, 48, 64, 40)
    samples = [Sample(f"what color is shape {i}?", f"answer {i}", make_image(200 + i, s)) for i, s in enumerate(sizes)]
    editor.edit(samples)
    batch = batch_of(vllm, samples)
    rows, _, _ = editor.route(editor.edit_layer_output(batch), batch)
    assert rows.tolist() == [0, 1, 2, 3]
    logits = vllm(batch)
    for i, s in enumerate(samples):
        single = batch_of(vllm, [s])
        torch.testing.assert_close(vllm(single)[0], logits[i, :single.length], atol=1e-5, rtol=1e-5)
    editor.restore()
    assert not torch.equal(vllm(batch), logits)


@torch.no_grad()
def test_generate_with_the_kv_cache_equals_full_forwards_under_edits(vllm, editor):
    force_routing(editor)
    samples = requests(3)
    editor.edit(samples)
    prompt, image = samples[0].prompt, make_image(7, 48)
    cached = vllm.generate([prompt], [image], max_new_tokens=6)[0]
    batch = vllm.prepare([prompt], [image], None)
    ids = []
    for _ in range(6):  # no cache: a full forward of prompt + generated tokens at every step
        next_id = int(vllm(batch)[0, -1].argmax())
        if next_id == vllm.tokenizer.eos_token_id:
            break
        ids.append(next_id)
        grow = lambda t, v: torch.cat([t, t.new_full((1, 1, *t.shape[2:]), 0) + v], dim=1)  # noqa: E731
        batch = dataclasses.replace(
            batch, inputs_embeds=torch.cat([batch.inputs_embeds, vllm.stack.embed_tokens(torch.tensor([[next_id]]))], 1),
            attention_mask=grow(batch.attention_mask, 1), position_ids=grow(batch.position_ids, batch.position_ids[:, -1:] + 1),
            token_ids=grow(batch.token_ids, next_id), labels=grow(batch.labels, 0),
            label_mask=grow(batch.label_mask, False),
            vision_layer_inputs=None if batch.vision_layer_inputs is None else grow(batch.vision_layer_inputs, 0.0),
            image_blocks=None if batch.image_blocks is None else grow(batch.image_blocks, -1))
    assert len(ids) >= 2 and cached == vllm.tokenizer.decode(ids, skip_special_tokens=True)
    edited = vllm(batch)
    editor.restore()
    assert not torch.equal(vllm(batch), edited)


# ---- the scripts ------------------------------------------------------------------------------------

def test_train_then_evaluate_liveedit_on_tiny_qwen_from_the_command_line(tmp_path):
    from toyworld.world import generate_toyworld

    generate_toyworld(str(tmp_path / "data" / "toyworld"), n_train=8, n_eval=4, n_pretrain_scenes=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    common = ["--data_dir", str(tmp_path / "data")]
    train = subprocess.run([sys.executable, os.path.join(ROOT, "train_vllm_editor.py"), "-en", "liveedit", "-mn",
                            "tiny-qwen2.5-vl", "-dna", "TOY", "-bs", "2", "--max_steps", "2",
                            "--records_dir", str(tmp_path / "records"), *common],
                           cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0 and "Traceback" not in train.stderr, train.stderr[-2000:]
    (checkpoint,) = glob.glob(str(tmp_path / "records" / "liveedit" / "tiny-qwen2.5-vl" / "*" / "checkpoints" / "step-2"))
    evaluate = subprocess.run([sys.executable, os.path.join(ROOT, "test_vllm_edit.py"), "-en", "liveedit", "-mn",
                               "tiny-qwen2.5-vl", "-dn", "TOY", "-sen", "2", "-dsn", "4", "-ckpt", checkpoint,
                               "--results_dir", str(tmp_path / "results"), "--no_progress", *common],
                              cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0 and "Traceback" not in evaluate.stderr, evaluate.stderr[-2000:]
    results = glob.glob(str(tmp_path / "results" / "liveedit" / "tiny-qwen2.5-vl" / "TOY" / "*" / "results.json"))
    assert len(results) == 1


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_prototype_length_is_refused_naming_the_key(value):
    from editors.liveedit.config import LiveEditConfig

    with pytest.raises(UserError, match="vision_prototype_tokens"):
        LiveEditConfig(vision_prototype_tokens=value)


def test_a_saved_folder_loads_in_the_mode_the_name_asks_for(vllm, tmp_path):
    from runs.eval_config import EvalConfig
    from runs.eval_run import expected_backbone

    save_vllm(hf_tiny(vllm.name + ":raw"), str(tmp_path))
    assert load_vllm(vllm.name, path=str(tmp_path)).prompt_mode == "chat"
    raw = load_vllm(vllm.name + ":raw", path=str(tmp_path))
    assert raw.prompt_mode == "raw" and raw.name == vllm.name + ":raw"
    for asked in (vllm.name, vllm.name + ":raw"):
        cfg = EvalConfig(sequential_edit_n=1, editor_name="liveedit", model_name=asked, data_name="TOY",
                         model_path=str(tmp_path))
        assert expected_backbone(cfg) == load_vllm(asked, path=str(tmp_path)).name


@torch.no_grad()
def test_rows_carry_the_deepstack_features_of_those_rows():
    vllm = hf_tiny("tiny-qwen3-vl")
    images = [varied_images()[2], None, varied_images()[0]]
    whole = vllm.prepare(PROMPTS, images, TARGETS)
    assert whole.vision_layer_inputs.shape[:3] == (3, whole.length, 2)  # both vision layers feed the LM
    for start, end in ((0, 2), (1, 3), (1, 2)):
        alone = vllm.prepare(PROMPTS[start:end], images[start:end], TARGETS[start:end])
        part = whole.rows(start, end)
        if alone.vision_layer_inputs is None:  # text-only rows: nothing is added
            assert not part.vision_layer_inputs.any()
        else:
            torch.testing.assert_close(part.vision_layer_inputs, alone.vision_layer_inputs, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(vllm(part), vllm(alone), atol=1e-5, rtol=1e-5)
