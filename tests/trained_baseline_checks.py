"""Checks every trained baseline with aux models (SERAC, RECIPE, LTE) must pass; each
tests/test_baseline_<name>.py calls them with its editor. Tiny backbone (tiny-blip2, shared),
the tiny aux stand-ins from the editor's tiny-blip2 config, a small toy world for training."""
from __future__ import annotations

import os

import numpy as np
import torch
import yaml

from conftest import ROOT, make_image, tiny_vllm
from editors import editor_class
from utils.config import from_dict
from utils.records import Sample

PROMPTS = ["what shape is shown?", "what color is the shape?", "count the shapes in the picture.",
           "nq question: what is the capital of belor"]


SETUP = {}  # editor name -> function(editor) run after building (e.g. force retrieval)


def build(name: str, vllm=None, **overrides):
    """Editor `name` on the shared tiny-blip2 from its tiny-blip2 config with `overrides`."""
    vllm = vllm or tiny_vllm("tiny-blip2")
    with open(os.path.join(ROOT, "configs", name, "tiny-blip2.yaml")) as f:
        data = yaml.safe_load(f)
    data.update(overrides)
    cls = editor_class(name)
    editor = cls(vllm, from_dict(cls.config_class, data))
    if name in SETUP:
        SETUP[name](editor)
    return editor


def requests(n: int, offset: int = 0) -> list[Sample]:
    return [Sample(PROMPTS[i % 3], f"answer {i}", make_image(100 + offset + i)) for i in range(n)]


def queries() -> list[Sample]:
    """Image rows and a text-only row."""
    return requests(3) + [Sample(PROMPTS[3], "zalu", None)]


def batch_of(vllm, samples, padding_side="right"):
    return vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples],
                        padding_side=padding_side)


def label_logits(vllm, samples) -> list[torch.Tensor]:
    """Per sample its logits at its label positions (independent of padding and prefixes)."""
    batch = batch_of(vllm, samples)
    logits = vllm(batch)
    return [logits[i][batch.label_mask[i]] for i in range(len(samples))]


def params(vllm) -> dict:
    return {k: v.detach().clone() for k, v in vllm.state_dict().items()}


@torch.no_grad()
def check_no_edits_identical(name: str, **overrides) -> None:
    vllm = tiny_vllm("tiny-blip2")
    before = label_logits(vllm, queries())
    editor = build(name, **overrides)
    try:
        after = label_logits(vllm, queries())
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    finally:
        editor.remove()


@torch.no_grad()
def check_restore_bit_identical(name: str, **overrides) -> None:
    """After edits that change the outputs, `restore()` gives the unedited logits and parameters."""
    vllm = tiny_vllm("tiny-blip2")
    before, weights = label_logits(vllm, queries()), params(vllm)
    editor = build(name, **overrides)
    try:
        editor.edit(requests(2))
        edited = label_logits(vllm, queries())
        assert any(not torch.equal(a, b) for a, b in zip(before, edited)), "the edits changed nothing"
        editor.restore()
        assert editor.num_edits == 0
        assert all(torch.equal(a, b) for a, b in zip(before, label_logits(vllm, queries())))
        assert all(torch.equal(weights[k], v) for k, v in vllm.state_dict().items())
    finally:
        editor.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, label_logits(vllm, queries())))


@torch.no_grad()
def check_batch_size_invariance(name: str, **overrides) -> None:
    """Scoring one row at a time gives the predictions of scoring all rows together."""
    vllm = tiny_vllm("tiny-blip2")
    editor = build(name, **overrides)
    try:
        editor.edit(requests(2))
        together = label_logits(vllm, queries())
        alone = [label_logits(vllm, [q])[0] for q in queries()]
        for a, b in zip(together, alone):
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    finally:
        editor.remove()


@torch.no_grad()
def check_save_load(name: str, tmp_path, **overrides) -> None:
    vllm = tiny_vllm("tiny-blip2")
    editor = build(name, **overrides)
    try:
        editor.edit(requests(2))
        saved = label_logits(vllm, queries())
        editor.save_edits(str(tmp_path / "edits"))
        editor.restore()
        editor.load_edits(str(tmp_path / "edits"))
        assert editor.num_edits == 2
        assert all(torch.equal(a, b) for a, b in zip(saved, label_logits(vllm, queries())))
    finally:
        editor.remove()


def train_losses(name: str, records, steps: int, batch_size: int = 4, vllm=None, **overrides) -> list[float]:
    """Losses of `steps` steps on `records` (cycled), the editor's own optimiser (on the shared
    tiny-blip2 unless `vllm` is given: an editor that trains the LLM needs its own)."""
    import tempfile

    from utils.records import data_fingerprint

    vllm = vllm or tiny_vllm("tiny-blip2")
    torch.manual_seed(0)
    editor = build(name, vllm=vllm, **overrides)
    losses = []
    run_dir = tempfile.TemporaryDirectory(prefix="train-losses-")
    try:
        editor.prepare_training(records, run_dir.name, data_fingerprint(records))  # as the trainer does
        editor.set_train(True)
        optimizer, _ = editor.make_optimizer()
        for step in range(steps):
            start = (step * batch_size) % len(records)
            batch = editor.training_batch(records[start:start + batch_size], np.random.default_rng(step))
            optimizer.zero_grad(set_to_none=True)
            losses.append(editor.train_step(batch)["Loss"])
            if step == 0:
                assert all(p.grad is None for n, p in vllm.named_parameters() if not editor_owns(editor, p))
            optimizer.step()
    finally:
        editor.set_train(False)
        editor.remove()
        run_dir.cleanup()
    return losses


def editor_owns(editor, param) -> bool:
    return any(param is p for m in editor.trainable_modules().values() for p in m.parameters())


def toy_records(root, n_train: int = 8):
    from runs.data import load_split
    from toyworld.world import generate_toyworld

    generate_toyworld(root / "toyworld", n_train=n_train, n_eval=4, n_pretrain_scenes=2)
    return load_split("TOY", "train", str(root))[1]


def check_cli_train_and_evaluate(name: str, tmp_path) -> None:
    """train_vllm_editor.py writes a checkpoint in 3 steps; test_vllm_edit.py evaluates it; without
    -ckpt it is refused unless --allow_untrained; resume reproduces the losses."""
    import pytest

    import test_vllm_edit
    from editors.checkpoint import find_latest
    from runs.training import TrainRunConfig, run_training
    from toyworld.world import generate_toyworld
    from utils.errors import UserError

    generate_toyworld(tmp_path / "data" / "toyworld", n_train=8, n_eval=4, n_pretrain_scenes=2)
    common = dict(editor_name=name, model_name="tiny-blip2", data_name="TOY", batch_size=4, seed=7,
                  data_dir=str(tmp_path / "data"), log_every=1)
    full = run_training(TrainRunConfig(max_steps=4, records_dir=str(tmp_path / "a"), **common), echo=None)
    half = run_training(TrainRunConfig(max_steps=2, records_dir=str(tmp_path / "b"), **common), echo=None)
    resumed = run_training(TrainRunConfig(max_steps=4, records_dir=str(tmp_path / "b"),
                                          resume_from=half.final_checkpoint, **common), echo=None)
    for step in (3, 4):
        assert resumed.losses[step] == full.losses[step], (step, resumed.losses, full.losses)
    ckpt = find_latest(os.path.join(full.run_dir, "checkpoints"))
    args = ["-en", name, "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "2", "-dsn", "4", "--no_progress",
            "--no-exact_match", "--data_dir", str(tmp_path / "data")]
    assert test_vllm_edit.main(args + ["-ckpt", ckpt, "--results_dir", str(tmp_path / "res")]) == 0
    with pytest.raises(UserError, match="-ckpt"):
        from runs.eval_run import check_trained
        check_trained(name, None, False)
    assert test_vllm_edit.main(args + ["--allow_untrained", "--results_dir", str(tmp_path / "res2")]) == 0
