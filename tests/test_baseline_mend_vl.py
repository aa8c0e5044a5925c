"""MEND-VL (editors/baselines/mend): the editing contract, batched editing, save/load, training."""
from __future__ import annotations

import dataclasses
import glob
import os
import tempfile

import pytest
import torch

from conftest import make_image, tiny_vllm
from editors.baselines.mend import MENDConfig, MENDVL
from editors.baselines.mend.editor import request_nll_sum
from utils.config import load_config
from utils.errors import UserError
from utils.records import Sample
from utils.scoring import teacher_forced

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["what color is the shape?", "how many shapes are there in this picture?", "where is the circle?"]
# An untrained editor with a negative edit lr: each edit is a plain descent step on the target NLL
# (the identity transform; trained editors learn their lr and transform, see docs/BASELINES.md, MEND-VL).
STRONG = MENDConfig(init_edit_lr=-10.0)


_IMAGE_DIR = tempfile.mkdtemp(prefix="mend-test-images-")


def image_path(seed: int) -> str:
    """A random image written once to a PNG file (the scorer reads images by path)."""
    path = os.path.join(_IMAGE_DIR, f"{seed}.png")
    if not os.path.isfile(path):
        make_image(seed).save(path)
    return path


def requests(n: int, offset: int = 0) -> list[Sample]:
    """n requests; every fourth one is text-only."""
    return [Sample(PROMPTS[i % 3], f"answer {i} zq", image_path(300 + offset + i) if i % 4 != 3 else None)
            for i in range(n)]


def batch_of(vllm, samples):
    return vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])


@pytest.fixture
def make_editor():
    """Editors on the shared tiny backbones; their hooks are removed after the test."""
    made = []

    def make(name: str = "tiny-blip2", config: MENDConfig = STRONG) -> MENDVL:
        editor = MENDVL(tiny_vllm(name), config)
        made.append(editor)
        return editor

    yield make
    for editor in made:
        editor.remove()


@pytest.mark.parametrize("name", ["tiny-blip2", "tiny-llava"])
@torch.no_grad()
def test_no_edits_then_edit_then_restore(name, make_editor):
    vllm = tiny_vllm(name)
    samples = requests(4)
    batch = batch_of(vllm, samples)
    params = {k: v.clone() for k, v in vllm.state_dict().items()}
    unedited = vllm(batch)
    editor = make_editor(name)
    assert torch.equal(vllm(batch), unedited)  # no edits: bit-identical
    one = batch_of(vllm, samples[:1])
    before = request_nll_sum(vllm(one)[one.label_mask], one)
    editor.edit(samples[:1])
    after = request_nll_sum(vllm(one)[one.label_mask], one)
    assert after < 0.95 * before  # a descent step on the target (negative edit lr, identity transform)
    assert editor.num_edits == 1
    editor.restore()
    assert torch.equal(vllm(batch), unedited)
    assert all(torch.equal(params[k], v) for k, v in vllm.state_dict().items())
    editor.edit(samples[:1])
    with vllm.unedited():  # the editor's module hooks honour `unedited()` like layer edits
        assert torch.equal(vllm(batch), unedited)
        with pytest.raises(RuntimeError, match="unedited"):
            editor.edit(samples[:1])
    assert not torch.equal(vllm(batch), unedited)


def test_targets_are_the_ffn_linears_of_the_last_three_layers(make_editor):
    blip2 = make_editor("tiny-blip2")
    assert [t.path for t in blip2.targets] == [f"layers.{i}.{m}" for i in (1, 2, 3) for m in ("fc1", "fc2")]
    assert [(t.group, t.mode) for t in blip2.targets[:3]] == [("64x128", 0), ("128x64", 0), ("64x128", 1)]
    llava = make_editor("tiny-llava")
    assert len(llava.targets) == 9 and sorted(llava.transforms) == ["128x64", "64x128"]
    assert llava.transforms["64x128"].layers[0].mode_scale.shape[0] == 6  # gate and up share a shape


def test_batched_is_the_row_weighted_average_of_single_edits(make_editor):
    editor = make_editor("tiny-llava")
    samples = requests(3)
    singles = []
    for s in samples:
        editor.edit([s])
        singles.append((list(editor._deltas), list(editor._rows)))
        editor.restore()
    editor.edit(samples)
    assert editor.supports_batch_edit and editor.num_edits == 3
    for i, delta in enumerate(editor._deltas):
        rows = [single[1][i] for single in singles]
        assert editor._rows[i] == sum(rows)
        expected = sum(single[0][i] * n for single, n in zip(singles, rows)) / sum(rows)
        torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)


def test_one_request_batched_equals_one_by_one_and_sequential_edits_average(make_editor):
    editor = make_editor()
    a, b = requests(2)
    editor.edit([a])
    first = list(editor._deltas)
    editor.restore()
    editor.config = dataclasses.replace(editor.config, batch_edit=False)
    assert not editor.supports_batch_edit
    editor.edit([a])
    assert all(torch.equal(x, y) for x, y in zip(first, editor._deltas))
    rows_a = list(editor._rows)
    editor.edit([b])  # its gradient is taken on the model with edit a in place, then averaged in
    assert editor.num_edits == 2 and all(n > m for n, m in zip(editor._rows, rows_a))


@torch.no_grad()
def test_scores_do_not_depend_on_the_evaluation_batch_size(make_editor):
    vllm = tiny_vllm("tiny-blip2")
    editor = make_editor()
    editor.edit(requests(2))
    samples = requests(8, offset=50)
    assert teacher_forced(vllm, samples, batch_size=1).predicted == teacher_forced(vllm, samples, batch_size=8).predicted


@torch.no_grad()
def test_save_and_load_edits(make_editor, tmp_path):
    vllm = tiny_vllm("tiny-blip2")
    editor = make_editor()
    editor.edit(requests(2))
    batch = batch_of(vllm, requests(3, offset=9))
    expected = vllm(batch)
    editor.save_edits(str(tmp_path / "edits"))
    editor.restore()
    editor.load_edits(str(tmp_path / "edits"))
    assert torch.equal(vllm(batch), expected) and editor.num_edits == 2
    with pytest.raises(UserError, match="edits.json"):
        editor.load_edits(str(tmp_path / "nothing"))


def test_bad_config_values_name_the_key(tmp_path):
    with pytest.raises(UserError, match="rank"):
        MENDConfig(rank=0)
    with pytest.raises(UserError, match="grad_clip"):
        MENDConfig(grad_clip=0)
    with pytest.raises(UserError, match="layers"):
        MENDVL(tiny_vllm("tiny-blip2"), MENDConfig(layers=[31]))
    path = tmp_path / "bad.yaml"
    path.write_text("rank: many\n")
    with pytest.raises(UserError, match="rank"):
        load_config(MENDConfig, str(path))


@pytest.mark.parametrize("backbone,family", [("blip2-opt-2.7b", "tiny-blip2"), ("llava-v1.5-7b", "tiny-llava"),
                                             ("minigpt-4-vicuna-7b", "tiny-minigpt4")])
def test_real_configs_edit_layers_29_to_31_of_32(backbone, family):
    from editors.vllms import build_tiny
    from editors.vllms.tiny import TinySpec

    config = load_config(MENDConfig, os.path.join(ROOT, "configs", "mend_vl", f"{backbone}.yaml"))
    assert (config.rank, config.init_edit_lr, config.lr, config.edit_lr_lr) == (1920, 1e-4, 1e-6, 1e-4)
    deep = build_tiny(family, TinySpec(num_layers=32, hidden_size=32, vision_hidden_size=32, vocab_size=300))
    editor = MENDVL(deep, config)
    assert sorted({int(t.path.split(".")[1]) for t in editor.targets}) == [29, 30, 31]
    editor.remove()


def test_non_finite_gradient_is_a_user_error():
    import numpy as np

    from toyworld.world import generate_toyworld  # noqa: F401  (records come from the toy world below)
    from utils.records import EditRecord

    vllm = tiny_vllm("tiny-blip2")
    editor = MENDVL(vllm, MENDConfig(init_edit_lr=1e38))
    try:
        rec = EditRecord(requests=requests(1), generality={"text_rephrase": requests(1, 7)},
                         locality={"text_loc": [Sample("what is two plus two?", "four")]})
        editor.set_train(True)
        batch = editor.training_batch([rec, rec], np.random.default_rng(0))
        with pytest.raises(UserError, match="not finite"):
            editor.train_step(batch)
    finally:
        editor.set_train(False)
        editor.remove()


# ---- training and the entry scripts ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("mend")
    generate_toyworld(str(root / "data" / "toyworld"), n_train=8, n_eval=4, n_pretrain_scenes=2)
    return root


def train_config(root, **overrides):
    from runs.training import TrainRunConfig

    settings = dict(editor_name="mend_vl", model_name="tiny-blip2", data_name="TOY", batch_size=4, max_steps=4,
                    seed=7, data_buffer_size=2, save_every=2, records_dir=str(root / "records"),
                    data_dir=str(root / "data"))
    settings.update(overrides)
    return TrainRunConfig(**settings)


def test_training_loss_falls(world):
    from runs.training import run_training

    result = run_training(train_config(world, batch_size=8, max_steps=30, data_limit=8), echo=None)
    losses = [result.losses[s] for s in sorted(result.losses)]
    # the same 8 records every step (one batch): the edit lr moves from ascent to descent
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    assert all(later <= earlier + 1e-3 for earlier, later in zip(losses, losses[1:])), losses


def test_resume_reproduces_the_losses(world, tmp_path):
    from runs.training import run_training

    full = run_training(train_config(world, records_dir=str(tmp_path / "a")), echo=None)
    half = run_training(train_config(world, records_dir=str(tmp_path / "b"), max_steps=2), echo=None)
    resumed = run_training(train_config(world, resume_from=half.final_checkpoint, seed=None), echo=None)
    assert sorted(resumed.losses) == [3, 4]
    for step in (1, 2):
        assert half.losses[step] == full.losses[step]
    for step in (3, 4):
        assert resumed.losses[step] == full.losses[step], (step, resumed.losses, full.losses)


def test_train_then_evaluate_from_the_command_line(world, tmp_path, capsys):
    import test_vllm_edit
    import train_vllm_editor

    records = tmp_path / "records"
    assert train_vllm_editor.main(["-en", "mend_vl", "-mn", "tiny-blip2", "-dna", "TOY", "-bs", "4", "--max_steps",
                                   "3", "--data_dir", str(world / "data"), "--records_dir", str(records)]) == 0
    checkpoint = glob.glob(str(records / "mend_vl" / "tiny-blip2" / "*" / "checkpoints" / "step-3"))[0]
    common = ["-en", "mend_vl", "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "2", "-dsn", "4", "--no_progress",
              "--data_dir", str(world / "data"), "--results_dir", str(tmp_path / "res")]
    capsys.readouterr()
    assert test_vllm_edit.main(common) == 2
    assert "--allow_untrained" in capsys.readouterr().err
    assert test_vllm_edit.main(common + ["-ckpt", checkpoint]) == 0
    assert "Rel" in capsys.readouterr().out
