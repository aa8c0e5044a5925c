"""Editor checkpoints at evaluation time: the checkpoint's own config, its backbone and editor, one
pinned step folder per evaluation, editors without modules, and the authors' torch.save format."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
import yaml

from conftest import make_image, tiny_vllm
from editors import load_editor
from editors.checkpoint import META_FILE, pin_checkpoint, save_checkpoint
from editors.liveedit.editor import LiveEdit
from utils.config import config_to_dict, load_config
from utils.errors import UserError
from utils.records import Sample
from runs.eval_config import EvalConfig
from runs.eval_run import check_checkpoint, run_evaluation

BACKBONE = "tiny-blip2"
YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "liveedit",
                    f"{BACKBONE}.yaml")
REQUEST = Sample(prompt="What is in the picture? The answer is:", target="a red cube", image=make_image(3))


@pytest.fixture(scope="module")
def vllm():
    return tiny_vllm(BACKBONE)


def trained_config():
    """The tiny YAML with another edit layer, LoRA scale and similarity scale (same tensor shapes)."""
    config = load_config(LiveEdit.config_class, YAML)
    retrieval = dataclasses.replace(config.retrieval_editor, lora_scale=2.0)
    return dataclasses.replace(config, edit_layer_i=1, retrieval_editor=retrieval, sim_scale=0.5)


def edited_logits(editor) -> torch.Tensor:
    """Logits of the edit request after one edit (then the editor is restored and unhooked)."""
    vllm = editor.vllm
    try:
        editor.edit([REQUEST])
        with torch.no_grad():
            return vllm(vllm.prepare([REQUEST.prompt], [REQUEST.image], [REQUEST.target])).clone()  # [1, l, V]
    finally:
        editor.restore()
        editor.remove()


@pytest.fixture(scope="module")
def unedited(vllm) -> torch.Tensor:
    """Logits of the edit request on the backbone alone (an edit must change them, or a test proves nothing)."""
    with torch.no_grad():
        return vllm(vllm.prepare([REQUEST.prompt], [REQUEST.image], [REQUEST.target])).clone()  # [1, l, V]


@pytest.fixture(scope="module")
def run_dir(vllm, tmp_path_factory):
    """A run folder whose checkpoints/step-1 holds a LiveEdit trained with `trained_config()`."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    torch.manual_seed(7)
    editor = LiveEdit(vllm, trained_config())
    try:
        save_checkpoint(str(run / "checkpoints"), editor, None, None, {"step": 1})
    finally:
        editor.remove()
    return run


@pytest.fixture(scope="module")
def reference(vllm, run_dir):
    """Logits after one edit with the editor the checkpoint was saved from (rebuilt from its file)."""
    torch.manual_seed(0)
    editor = LiveEdit(vllm, trained_config())
    from editors.checkpoint import load_editor_weights

    load_editor_weights(editor, str(run_dir / "checkpoints" / "step-1"))
    return edited_logits(editor)


def eval_config(**changes) -> EvalConfig:
    return EvalConfig(**{"sequential_edit_n": 1, "editor_name": "liveedit", "model_name": BACKBONE,
                         "data_name": "TOY", "show_progress": False, "exact_match": False, "tensorboard": False,
                         "plot": False, **changes})


# ---- item 6: the checkpoint's own config, backbone and editor -------------------------------------

def test_editor_is_built_from_the_checkpoints_config(vllm, run_dir, reference, unedited):
    assert not torch.equal(reference, unedited)
    editor = load_editor("liveedit", vllm, checkpoint=str(run_dir))
    assert editor.config == trained_config()  # not the YAML's edit_layer_i 2 / lora_scale 5
    assert torch.equal(edited_logits(editor), reference)


def test_a_conflicting_config_is_refused_naming_the_keys(vllm, run_dir, tmp_path):
    with pytest.raises(UserError) as info:
        load_editor("liveedit", vllm, config_path=YAML, checkpoint=str(run_dir))
    message = str(info.value)
    assert "edit_layer_i" in message and "retrieval_editor.lora_scale" in message and "sim_scale" in message
    assert "train_cfg" not in message and YAML in message
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(json.loads(json.dumps(config_to_dict(trained_config())))))
    editor = load_editor("liveedit", vllm, config_path=str(same), checkpoint=str(run_dir))  # agrees: accepted
    editor.remove()


def test_a_checkpoint_of_another_backbone_is_refused_before_anything_loads(run_dir, tmp_path):
    data_dir = tmp_path / "data"  # never created: the refusal comes before the data and the backbone
    with pytest.raises(UserError) as info:
        run_evaluation(eval_config(model_name="tiny-minigpt4", editor_checkpoint=str(run_dir),
                                   data_dir=str(data_dir)))
    assert "tiny-blip2" in str(info.value) and "tiny-minigpt4" in str(info.value) and META_FILE in str(info.value)
    assert not data_dir.exists()


def test_a_checkpoint_of_another_backbone_is_refused_by_load_editor(run_dir):
    minigpt4 = tiny_vllm("tiny-minigpt4")
    hooks = [len(layer._forward_hooks) for layer in minigpt4.layers]
    with pytest.raises(UserError, match="trained on backbone tiny-blip2, not tiny-minigpt4"):
        load_editor("liveedit", minigpt4, checkpoint=str(run_dir))
    assert [len(layer._forward_hooks) for layer in minigpt4.layers] == hooks  # refused before hooking in


def test_a_checkpoint_of_another_editor_is_refused(run_dir, tmp_path):
    other = tmp_path / "step-1"
    shutil.copytree(run_dir / "checkpoints" / "step-1", other)
    meta = json.loads((other / META_FILE).read_text())
    (other / META_FILE).write_text(json.dumps({**meta, "editor": "serac"}))
    with pytest.raises(UserError, match="trained for editor serac, not liveedit"):
        check_checkpoint(eval_config(editor_checkpoint=str(other)))


# ---- item 7: one pinned step folder per evaluation ----------------------------------------------

def test_a_run_folder_is_pinned_to_one_step_folder(vllm, run_dir, tmp_path):
    from toyworld.world import generate_toyworld

    data_dir = tmp_path / "data"
    generate_toyworld(data_dir / "toyworld", n_train=2, n_eval=2, n_pretrain_scenes=2)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    step1 = os.path.realpath(run / "checkpoints" / "step-1")
    cfg = eval_config(editor_checkpoint=str(run), data_dir=str(data_dir), results_dir=str(tmp_path / "results"))
    first = run_evaluation(cfg)
    with open(os.path.join(first.folder, "progress", "run.json")) as f:
        assert json.load(f)["identity"]["editor_checkpoint"] == step1  # the step folder, not the run folder
    editor = LiveEdit(vllm, trained_config())  # a newer checkpoint appears; `latest` moves to step-2
    try:
        save_checkpoint(str(run / "checkpoints"), editor, None, None, {"step": 2})
    finally:
        editor.remove()
    with pytest.raises(UserError, match="differs in: editor_checkpoint"):
        run_evaluation(cfg)
    resumed = run_evaluation(dataclasses.replace(cfg, editor_checkpoint=str(run / "checkpoints" / "step-1")))
    assert resumed.already_complete and resumed.folder == first.folder


# ---- item 8: editors without modules, missing paths (CLI) ----------------------------------------

def cli_error(capsys, *args) -> str:
    import test_vllm_edit

    rc = test_vllm_edit.main(["-mn", BACKBONE, "-sen", "1", "-dn", "toy", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("editor", ["ft_l", "none"])
def test_an_editor_without_modules_refuses_a_checkpoint(editor, run_dir, tmp_path, capsys):
    data_dir = tmp_path / "data"
    err = cli_error(capsys, "-en", editor, "-ckpt", str(run_dir), "--data_dir", str(data_dir))
    assert f"editor {editor} has no trained modules" in err and str(run_dir) in err and "-ckpt" in err
    assert not data_dir.exists()


def test_a_missing_checkpoint_is_named(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    err = cli_error(capsys, "-en", "liveedit", "-ckpt", missing, "--data_dir", str(tmp_path / "data"))
    assert f"checkpoint path does not exist: {missing}" in err
    assert not (tmp_path / "data").exists()


# ---- item 9: the authors' torch.save format -------------------------------------------------------

def authors_file(vllm, path, extra=None) -> torch.Tensor:
    """Write a LiveEdit (YAML config) in the authors' format; returns its logits after one edit."""
    torch.manual_seed(0)  # modules whose expert is selected for REQUEST: the edit changes the logits
    editor = load_editor("liveedit", vllm)
    modules = {name: module.state_dict() for name, module in editor.trainable_modules().items()}
    optimizer = torch.optim.Adam([p for m in editor.trainable_modules().values() for p in m.parameters()])
    torch.save({"train_modules": modules, "i": 40, "epoch": 2, "loss": 0.5, "ema_loss": 0.25,
                "opt": optimizer.state_dict(), "lr_scheduler": None, **(extra or {})}, path)
    return edited_logits(editor)


def test_the_authors_checkpoint_loads_with_ckpt(vllm, tmp_path, unedited):
    path = str(tmp_path / "epoch-2-i-40-ema_loss-0.2500")  # the authors' file names have no extension
    original = authors_file(vllm, path)
    assert not torch.equal(original, unedited)
    editor = load_editor("liveedit", vllm, checkpoint=path)
    assert torch.equal(edited_logits(editor), original)
    assert check_checkpoint(eval_config(editor_checkpoint=path)).kind == "authors"


class Payload:
    """An arbitrary object: unpickling it would need its class (and could run code)."""


def test_an_authors_checkpoint_with_pickled_objects_is_refused(vllm, tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    authors_file(vllm, path, extra={"payload": Payload()})
    with pytest.raises(UserError) as info:
        pin_checkpoint(path)
    assert path in str(info.value) and "Payload" in str(info.value) and "arbitrary code" in str(info.value)
    err = cli_error(capsys, "-en", "liveedit", "-ckpt", path, "--data_dir", str(tmp_path / "data"))
    assert "refused" in err and not (tmp_path / "data").exists()


def test_the_authors_checkpoint_converts_into_a_step_folder(vllm, tmp_path, capsys):
    from editors.authors_checkpoint import main

    path = str(tmp_path / "authors.pth")
    original = authors_file(vllm, path)
    out = str(tmp_path / "converted" / "step-40")
    assert main(["convert", path, out, "--backbone", BACKBONE]) == 0
    meta = json.loads(open(os.path.join(out, META_FILE)).read())
    assert meta["backbone"] == BACKBONE and meta["editor"] == "liveedit" and meta["step"] == 40
    assert meta["editor_config"] == json.loads(json.dumps(config_to_dict(load_config(LiveEdit.config_class, YAML))))
    editor = load_editor("liveedit", vllm, checkpoint=out)
    assert torch.equal(edited_logits(editor), original)
    with pytest.raises(UserError, match="trained on backbone tiny-blip2, not tiny-llava"):
        check_checkpoint(eval_config(model_name="tiny-llava", editor_checkpoint=out))
    assert main(["convert", path, out, "--backbone", BACKBONE]) == 2  # never overwrites
    assert out in capsys.readouterr().err
