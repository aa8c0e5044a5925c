"""The backbone interface on the three tiny backbones (DESIGN.md §2, issue acceptance)."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import TINY, make_image, tiny_vllm
from editors.vllms import canonical_name, load_vllm, save_vllm
from utils.errors import UserError

PROMPTS = ["what color is the shape? The answer is:", "how many?", "nq question: what is the capital of x?"]
TARGETS = ["red", "two three", "pomox"]


def mixed_batch(vllm):
    images = [make_image(1), make_image(2), None]
    return vllm.prepare(PROMPTS, images, TARGETS)


@torch.no_grad()
def test_save_then_load_gives_bit_identical_logits(vllm, tmp_path):
    batch = mixed_batch(vllm)
    save_vllm(vllm, str(tmp_path))
    family = {"tiny-blip2": "blip2", "tiny-llava": "llava", "tiny-minigpt4": "minigpt4"}[vllm.name]
    loaded = load_vllm(family, path=str(tmp_path))
    assert loaded.name == vllm.name
    assert torch.equal(vllm(batch), loaded(loaded.prepare(PROMPTS, [make_image(1), make_image(2), None], TARGETS)))


@torch.no_grad()
def test_vision_span_holds_the_projected_image_features(vllm):
    batch = mixed_batch(vllm)
    features = vllm.encode_images(vllm.pixel_values([make_image(1), make_image(2)]))  # [2, n, d]
    for row in (0, 1):
        v0, v1 = batch.vision_spans[row].tolist()
        assert v1 - v0 == vllm.num_image_tokens
        assert torch.equal(batch.inputs_embeds[row, v0:v1], features[row])
    assert batch.vision_spans[2].tolist() == [0, 0] and not batch.has_image[2]


@torch.no_grad()
def test_rows_of_a_batch_equal_the_batch_of_those_rows(vllm):
    """LiveEdit training prepares all samples of a step as one batch and splits it with `rows`."""
    images = [make_image(1), make_image(2), None]
    whole = vllm.prepare(PROMPTS, images, TARGETS)
    for start, end in ((0, 2), (1, 3), (2, 3)):
        alone = vllm.prepare(PROMPTS[start:end], images[start:end], TARGETS[start:end])
        part = whole.rows(start, end)
        assert part.length == alone.length  # trailing all-padding columns are dropped
        for name in ("attention_mask", "position_ids", "token_ids", "vision_spans", "query_spans",
                     "target_spans", "labels", "label_mask", "has_image"):
            assert torch.equal(getattr(part, name), getattr(alone, name)), name
        assert torch.allclose(part.inputs_embeds, alone.inputs_embeds, atol=1e-6)


@torch.no_grad()
def test_labels_select_exactly_the_target_tokens(vllm):
    batch = mixed_batch(vllm)
    tok = vllm.tokenizer
    for row, target in enumerate(TARGETS):
        t0, t1 = batch.target_spans[row].tolist()
        target_ids = batch.token_ids[row, t0:t1].tolist()
        assert tok.decode(target_ids).strip() == target
        predicted_at = batch.label_mask[row].nonzero().flatten().tolist()
        assert predicted_at == list(range(t0 - 1, t1 - 1))
        assert batch.labels[row, batch.label_mask[row]].tolist() == target_ids
        q0, q1 = batch.query_spans[row].tolist()
        assert q1 == t0  # the query ends at the last prompt token
        assert tok.decode(batch.token_ids[row, q0:q1][batch.token_ids[row, q0:q1] >= 0]).strip().endswith(
            PROMPTS[row].split()[-1])


@torch.no_grad()
def test_rows_of_a_padded_batch_match_single_rows(vllm):
    batch = mixed_batch(vllm)
    logits = vllm(batch)
    images = [make_image(1), make_image(2), None]
    for row in range(3):
        single = vllm.prepare([PROMPTS[row]], [images[row]], [TARGETS[row]])
        n = single.length
        assert torch.allclose(vllm(single)[0], logits[row, :n], atol=1e-5)
        assert single.label_mask[0].tolist() == batch.label_mask[row, :n].tolist()


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_stop_after_layer_matches_full_forward(vllm, layer):
    batch = mixed_batch(vllm)
    out = vllm.stack.inner(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, output_hidden_states=True)
    hidden = vllm.hidden_at_layer(batch, layer)
    assert torch.equal(hidden, out.hidden_states[layer + 1])
    assert torch.allclose(vllm.logits_from_layer(batch, hidden, layer), vllm(batch), atol=1e-6)


@torch.no_grad()
def test_generate_with_left_padding_matches_single_rows(vllm):
    images = [make_image(1), None]
    both = vllm.generate(PROMPTS[:2], images, max_new_tokens=5)
    singles = [vllm.generate([p], [im], max_new_tokens=5)[0] for p, im in zip(PROMPTS[:2], images)]
    assert both == singles


def test_prompt_with_image_placeholder_is_refused():
    vllm = tiny_vllm("tiny-llava")
    with pytest.raises(UserError, match="placeholder"):
        vllm.prepare(["<image> what is it?"], [make_image(0)], ["x"])


def test_names_are_case_insensitive_and_unknown_names_list_valid_ones():
    assert canonical_name("BLIP2") == "blip2-opt-2.7b"
    assert canonical_name("LLaVA-v1.5-7B") == "llava-v1.5-7b"
    assert canonical_name("minigpt4") == "minigpt-4-vicuna-7b"
    with pytest.raises(UserError, match="tiny-blip2"):
        canonical_name("gpt5")


def test_missing_model_path_names_all_three_ways(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIVEEDIT_MODEL_PATHS", raising=False)
    monkeypatch.delenv("LIVEEDIT_LLAVA_V1_5_7B_PATH", raising=False)
    with pytest.raises(UserError) as err:
        load_vllm("llava")
    text = str(err.value)
    assert "--model_path" in text and "LIVEEDIT_LLAVA_V1_5_7B_PATH" in text and "model_paths.yaml" in text


def test_model_path_precedence_flag_env_yaml(tmp_path, monkeypatch):
    from editors.vllms.paths import resolve_model_path

    dirs = {k: tmp_path / k for k in ("flag", "env", "yaml")}
    for d in dirs.values():
        d.mkdir()
    paths_file = tmp_path / "paths.yaml"
    paths_file.write_text(f"blip2-opt-2.7b: {dirs['yaml']}\n")
    monkeypatch.setenv("LIVEEDIT_MODEL_PATHS", str(paths_file))
    monkeypatch.delenv("LIVEEDIT_BLIP2_OPT_2_7B_PATH", raising=False)
    assert resolve_model_path("blip2-opt-2.7b") == str(dirs["yaml"])
    monkeypatch.setenv("LIVEEDIT_BLIP2_OPT_2_7B_PATH", str(dirs["env"]))
    assert resolve_model_path("blip2-opt-2.7b") == str(dirs["env"])
    assert resolve_model_path("blip2-opt-2.7b", str(dirs["flag"])) == str(dirs["flag"])
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_path("blip2-opt-2.7b", str(tmp_path / "nowhere"))


def test_folder_of_another_architecture_is_refused(tmp_path):
    save_vllm(tiny_vllm("tiny-llava"), str(tmp_path))
    with pytest.raises(UserError, match="llava"):
        load_vllm("blip2", path=str(tmp_path))


def test_missing_device_is_a_clear_error():
    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(UserError, match="cuda:3"):
        load_vllm("tiny-blip2", device="cuda:3")
