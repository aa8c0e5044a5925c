"""Auxiliary models of the baselines (editors/auxiliary.py): tiny stand-ins, real folders found
like a backbone's (flag > env var > paths YAML), and the input-prefix extension of the backbone."""
from __future__ import annotations

import pytest
import torch

from conftest import make_image, tiny_vllm
from editors.auxiliary import TINY_AUX, build_tiny_aux, encode_texts, load_aux, save_aux
from editors.vllms.batch import with_prefix
from editors.vllms.paths import set_aux_flag_paths
from utils.errors import UserError


@pytest.fixture(autouse=True)
def clean_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("LIVEEDIT_MODEL_PATHS", str(tmp_path / "no_paths.yaml"))
    monkeypatch.delenv("LIVEEDIT_BERT_BASE_CASED_PATH", raising=False)
    set_aux_flag_paths([])
    yield
    set_aux_flag_paths([])


def test_tiny_stand_ins_are_the_real_classes_and_seeded():
    kinds = {n: type(build_tiny_aux(n).model).__name__ for n in TINY_AUX}
    assert kinds == {"tiny-bert": "BertModel", "tiny-opt": "OPTModel", "tiny-roberta": "RobertaModel",
                     "tiny-mpnet": "MPNetModel"}
    a, b = build_tiny_aux("tiny-roberta", seed=3), build_tiny_aux("tiny-roberta", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@torch.no_grad()
@pytest.mark.parametrize("how", ["flag", "env", "yaml"])
def test_real_layout_folder_loads_through_path_resolution(tmp_path, monkeypatch, how):
    """A tiny BERT saved with save_pretrained + its tokenizer, in a folder named for bert-base-cased,
    loads by the real name through each of the three ways, with the same outputs."""
    aux = build_tiny_aux("tiny-bert", seed=5)
    folder = tmp_path / "bert-base-cased"
    save_aux(aux, str(folder))
    if how == "flag":
        set_aux_flag_paths([f"bert-base-cased={folder}"])
    elif how == "env":
        monkeypatch.setenv("LIVEEDIT_BERT_BASE_CASED_PATH", str(folder))
    else:
        (tmp_path / "paths.yaml").write_text(f"bert-base-cased: {folder}\n")
        monkeypatch.setenv("LIVEEDIT_MODEL_PATHS", str(tmp_path / "paths.yaml"))
    loaded = load_aux("bert-base-cased")
    assert type(loaded.model).__name__ == "BertModel" and loaded.tokenizer is not None
    texts = ["what shape is shown? square", "count the shapes"]
    for got, want in zip(encode_texts(loaded, texts)[:2], encode_texts(aux, texts)[:2]):
        torch.testing.assert_close(got, want)


def test_missing_folder_names_all_three_ways():
    with pytest.raises(UserError) as info:
        load_aux("roberta-base")
    message = str(info.value)
    assert "--aux_model_path roberta-base=" in message
    assert "LIVEEDIT_ROBERTA_BASE_PATH" in message and "model_paths.yaml" in message.replace("no_paths", "model_paths")


def test_folder_of_another_model_and_bad_flag_are_refused(tmp_path):
    save_aux(build_tiny_aux("tiny-opt"), str(tmp_path / "opt"))
    set_aux_flag_paths([f"bert-base-cased={tmp_path / 'opt'}"])
    with pytest.raises(UserError, match="'opt' model, but bert-base-cased needs model_type 'bert'"):
        load_aux("bert-base-cased")
    with pytest.raises(UserError, match="--aux_model_path takes NAME=FOLDER"):
        set_aux_flag_paths(["bert-base-cased"])
    with pytest.raises(UserError, match="unknown auxiliary model"):
        load_aux("bert-large")


def test_cli_bad_aux_flag_exits_2(capsys):
    import test_vllm_edit

    assert test_vllm_edit.main(["-en", "serac_vl", "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "1",
                                "--aux_model_path", "opt-125m"]) == 2
    assert "--aux_model_path takes NAME=FOLDER" in capsys.readouterr().err


# ---- the backbone's input prefixes (editors/vllms/batch.py:with_prefix, VLLM.add_input_prefix) ----

@torch.no_grad()
@pytest.mark.parametrize("side", ["right", "left"])
def test_prefix_rows_score_like_the_row_built_by_hand(side):
    """Prefixed rows of a padded batch give, at their label positions, the logits of the single row
    [prefix ; row] with no padding; spans point at the same embeddings as before."""
    vllm = tiny_vllm("tiny-blip2")
    prompts, targets = ["what shape is shown?", "nq question: where is it"], ["a circle", "zalu"]
    images = [make_image(1), None]
    batch = vllm.prepare(prompts, images, targets, padding_side=side)
    prefixes = [torch.randn(3, vllm.hidden_size) * 0.02, None]
    out = with_prefix(batch, prefixes, side)
    logits = vllm(out)
    for i in range(2):
        single = vllm.prepare([prompts[i]], [images[i]], [targets[i]])
        alone = with_prefix(single, [prefixes[i]])
        want = vllm(alone)[0][alone.label_mask[0]]
        torch.testing.assert_close(logits[i][out.label_mask[i]], want, rtol=1e-4, atol=1e-4)
        assert torch.equal(out.labels[i][out.label_mask[i]], batch.labels[i][batch.label_mask[i]])
        for name in ("query_spans", "target_spans"):
            (a0, a1), (b0, b1) = getattr(batch, name)[i].tolist(), getattr(out, name)[i].tolist()
            assert torch.equal(batch.inputs_embeds[i, a0:a1], out.inputs_embeds[i, b0:b1])
    v0, v1 = out.vision_spans[0].tolist()
    assert v0 == (3 if side == "right" else out.length - out.attention_mask[0].sum() + 3)
    assert out.vision_spans[1].tolist() == [0, 0]


@torch.no_grad()
def test_add_input_prefix_applies_in_prepare_but_not_unedited_and_detaches():
    vllm = tiny_vllm("tiny-blip2")
    prefix = torch.ones(2, vllm.hidden_size) * 0.01
    plain = vllm.prepare(["what shape is shown?"], [make_image(2)], ["square"])
    handle = vllm.add_input_prefix(lambda prompts, images: [prefix for _ in prompts])
    try:
        assert vllm.prepare(["what shape is shown?"], [make_image(2)], ["square"]).length == plain.length + 2
        with vllm.unedited():
            assert vllm.prepare(["what shape is shown?"], [make_image(2)], ["square"]).length == plain.length
    finally:
        handle.remove()
    assert vllm.prepare(["what shape is shown?"], [make_image(2)], ["square"]).length == plain.length


# ---- the editors' configs on every backbone ---------------------------------------------------------

EDITORS = ("serac_vl", "recipe_vl", "lte_vl")
BACKBONES = ("blip2-opt-2.7b", "llava-v1.5-7b", "minigpt-4-vicuna-7b", "tiny-blip2", "tiny-llava", "tiny-minigpt4")


@pytest.mark.parametrize("editor", EDITORS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_configs_parse_and_name_the_right_aux_models(editor, backbone):
    from editors import default_config_path, editor_class
    from editors.auxiliary import REAL_AUX
    from utils.config import config_to_dict, load_config

    cfg = config_to_dict(load_config(editor_class(editor).config_class, default_config_path(editor, backbone)))
    names = [v for k, v in cfg.items() if k.endswith("_model")]
    assert names and all((n in TINY_AUX) == backbone.startswith("tiny-") for n in names)
    assert all(n in TINY_AUX or n in REAL_AUX for n in names)


@torch.no_grad()
@pytest.mark.parametrize("editor", EDITORS)
@pytest.mark.parametrize("backbone", ["tiny-llava", "tiny-minigpt4"])
def test_editors_edit_and_score_on_the_llama_backbones(editor, backbone):
    """Each editor builds from its config on the other families, edits, changes nothing before the
    edit, and restores bit for bit."""
    from editors import load_editor
    from utils.records import Sample

    vllm = tiny_vllm(backbone)
    batch_args = (["what shape is shown?", "nq question: where"], [make_image(3), None], ["a circle", "zalu"])
    before = vllm(vllm.prepare(*batch_args))
    ed = load_editor(editor, vllm)
    try:
        ed.edit([Sample("what shape is shown?", "a circle", make_image(3))])
        assert ed.num_edits == 1
        out = vllm(vllm.prepare(*batch_args))
        assert out.shape[0] == 2 and torch.isfinite(out).all()
        ed.restore()
        assert torch.equal(vllm(vllm.prepare(*batch_args)), before)
    finally:
        ed.remove()
