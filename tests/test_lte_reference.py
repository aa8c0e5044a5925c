"""LTE-VL's locality references stored once per run (editors/baselines/lte_reference.py): the losses
equal those of the removed frozen LLM copy, no second LLM copy exists, the stored folder is keyed by
backbone and data, written atomically, and read (not recomputed) by a resumed run."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn

import trained_baseline_checks as checks
from editors.baselines.lte_reference import FOLDER, MANIFEST, locality_samples
from editors.baselines.lte_training import reembed
from utils.errors import UserError
from utils.records import data_fingerprint

NAME = "lte_vl"


@torch.no_grad()
def frozen_copy_log_probs(ref: nn.Module, batch) -> torch.Tensor:
    """The removed implementation: a hook-free deepcopy of the original stack run on the batch [n, V]."""
    b = reembed(ref, batch)
    hidden, _ = ref.hidden(b.inputs_embeds, b.attention_mask, b.position_ids)
    return ref.lm_head(hidden[b.label_mask]).float().log_softmax(-1)


def test_losses_equal_those_of_a_frozen_llm_copy(tmp_path):
    """Four steps (lr 1e-3, so the LLM moves) with the stored references and, on an identical
    backbone, with the old frozen copy's references computed per batch: same references, same losses
    (float rounding: the references were computed in other batches)."""
    from editors.vllms import build_tiny

    records = checks.toy_records(tmp_path, n_train=8)
    fingerprint = data_fingerprint(records)
    runs = {}
    for way in ("stored", "frozen copy"):
        vllm = build_tiny("tiny-blip2")
        original = copy.deepcopy(vllm.stack).eval().requires_grad_(False)  # as the removed `frozen_copy`
        for module in original.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        editor = checks.build(NAME, vllm=vllm, lr=1e-3)
        try:
            editor.prepare_training(records, str(tmp_path / way), fingerprint)
            editor.set_train(True)
            optimizer, _ = editor.make_optimizer()
            losses, pres = [], []
            for step in range(4):
                batch = editor.training_batch(records[(step * 4) % 8:][:4], np.random.default_rng(step))
                if way == "frozen copy":
                    batch.pre = {key: frozen_copy_log_probs(original, batch.groups[key]) for key in batch.pre}
                pres.append(batch.pre)
                optimizer.zero_grad(set_to_none=True)
                torch.manual_seed(step)
                losses.append(editor.train_step(batch))
                optimizer.step()
            # the references are the ORIGINAL LLM's: the trained one now gives other ones
            key = next(iter(batch.pre))
            assert not torch.allclose(frozen_copy_log_probs(vllm.stack, batch.groups[key]), batch.pre[key], atol=1e-3)
        finally:
            editor.set_train(False)
            editor.remove()
        runs[way] = losses, pres
    (stored, stored_pre), (old, old_pre) = runs["stored"], runs["frozen copy"]
    for a, b in zip(stored_pre, old_pre):
        assert a.keys() == b.keys() and len(a) == 2  # text and image locality
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    for a, b in zip(stored, old):
        assert a.keys() == b.keys()
        for term in a:
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-6), (term, stored, old)
    assert stored[-1]["Loss"] < stored[0]["Loss"]


def reachable(root) -> tuple[list[nn.Module], dict[int, torch.Tensor]]:
    """Every nn.Module and tensor reachable from `root` through attributes, containers and modules."""
    modules, tensors, seen, todo = [], {}, set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), np.ndarray)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            tensors[id(obj)] = obj
            continue
        if isinstance(obj, nn.Module):
            modules.append(obj)
            todo.extend(obj._parameters.values())
            todo.extend(obj._buffers.values())
            todo.extend(obj._modules.values())
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo.extend(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            todo.extend([obj.param_groups, obj.state])
        if hasattr(obj, "__dict__") and not isinstance(obj, type):
            todo.extend(vars(obj).values())
    return modules, tensors


def test_the_trainer_holds_one_llm(tmp_path):
    """Trainer + editor after a prepared batch: each decoder layer and the decoder stack exist once (the
    backbone's), and the only parameters are the backbone's and the retriever's."""
    from editors.vllms import build_tiny
    from runs.training import Trainer, TrainRunConfig

    records = checks.toy_records(tmp_path, n_train=8)
    vllm = build_tiny("tiny-blip2")
    editor = checks.build(NAME, vllm=vllm)
    try:
        cfg = TrainRunConfig(editor_name=NAME, model_name="tiny-blip2", data_name="TOY", batch_size=4, max_steps=2,
                             data_dir=str(tmp_path), records_dir=str(tmp_path / "records"))
        editor.prepare_training(records, str(tmp_path / "run"), data_fingerprint(records))
        trainer = Trainer(cfg, 0, editor, records)
        batch = trainer.make_batch(1)
        modules, tensors = reachable((trainer, batch))
        layer_type = type(vllm.stack.layers[0])
        assert sum(isinstance(m, layer_type) for m in modules) == vllm.num_layers
        assert sum(type(m) is type(vllm.stack) for m in modules) == 1
        params = {t.untyped_storage().data_ptr(): t.numel() for t in tensors.values() if isinstance(t, nn.Parameter)}
        own = {p.untyped_storage().data_ptr(): p.numel()
               for p in list(vllm.parameters()) + list(editor.retriever.model.parameters())}
        assert params == own, "parameters other than the backbone's and the retriever's"
        assert sum(params.values()) == sum(p.numel() for p in vllm.parameters()) + sum(
            p.numel() for p in editor.retriever.model.parameters())
    finally:
        editor.remove()


def test_stored_references_are_keyed_by_backbone_and_data(tmp_path):
    from editors.vllms import build_tiny
    from editors.vllms.tiny import TinySpec

    records = checks.toy_records(tmp_path, n_train=8)
    fingerprint = data_fingerprint(records)
    run = tmp_path / "run"
    editor = checks.build(NAME)
    try:
        editor.prepare_training(records, str(run), fingerprint)
        folder = run / FOLDER
        assert sorted(os.listdir(folder)) == ["logits.bin", MANIFEST]
        assert len(editor.reference.index) == len(locality_samples(records))
        stamp = os.stat(folder / "logits.bin").st_mtime_ns
        editor.prepare_training(records, str(run), fingerprint)  # read again, not recomputed
        assert os.stat(folder / "logits.bin").st_mtime_ns == stamp
        other = records[:4]
        with pytest.raises(UserError, match=f"{FOLDER}.*other training data"):
            editor.prepare_training(other, str(run), data_fingerprint(other))
    finally:
        editor.remove()
    other_backbone = checks.build(NAME, vllm=build_tiny("tiny-blip2", TinySpec(seed=1)))
    try:
        with pytest.raises(UserError, match=f"{FOLDER}.*another backbone.*weights_digest"):
            other_backbone.prepare_training(records, str(run), fingerprint)
    finally:
        other_backbone.remove()


def test_a_truncated_or_corrupt_store_is_refused_by_name(tmp_path):
    records = checks.toy_records(tmp_path, n_train=8)
    fingerprint = data_fingerprint(records)
    editor = checks.build(NAME)
    try:
        editor.prepare_training(records, str(tmp_path / "run"), fingerprint)
        logits = tmp_path / "run" / FOLDER / "logits.bin"
        with open(logits, "r+b") as f:
            f.truncate(os.path.getsize(logits) // 2)
        with pytest.raises(UserError, match="logits.bin is missing or truncated.*delete"):
            editor.prepare_training(records, str(tmp_path / "run"), fingerprint)
        (tmp_path / "run" / FOLDER / MANIFEST).write_text("{")
        with pytest.raises(UserError, match=f"{MANIFEST} is empty or corrupt"):
            editor.prepare_training(records, str(tmp_path / "run"), fingerprint)
    finally:
        editor.remove()


def test_a_failed_build_leaves_no_folder(tmp_path):
    """An unreadable locality image stops the pass: the run folder has no half-written references."""
    records = checks.toy_records(tmp_path, n_train=8)
    image = next(s.image for s in locality_samples(records) if s.image is not None)
    with open(image, "wb") as f:
        f.write(b"not a picture")
    editor = checks.build(NAME)
    try:
        with pytest.raises(Exception):
            editor.prepare_training(records, str(tmp_path / "run"), data_fingerprint(records))
    finally:
        editor.remove()
    left = os.listdir(tmp_path / "run") if os.path.isdir(tmp_path / "run") else []
    assert not [n for n in left if FOLDER in n], left  # neither the folder nor its temporary sibling


def test_a_resumed_run_reads_the_stored_references(tmp_path):
    """Resuming does not recompute them (the LLM is the trained one by then) and continues exactly."""
    from runs.training import TrainRunConfig, run_training
    from toyworld.world import generate_toyworld

    generate_toyworld(tmp_path / "data" / "toyworld", n_train=8, n_eval=4, n_pretrain_scenes=2)
    common = dict(editor_name=NAME, model_name="tiny-blip2", data_name="TOY", batch_size=4, seed=3,
                  data_dir=str(tmp_path / "data"), records_dir=str(tmp_path / "runs"), log_every=1)
    said = []
    half = run_training(TrainRunConfig(max_steps=2, **common), echo=said.append)
    stored = os.path.join(half.run_dir, FOLDER, "logits.bin")
    stamp = os.stat(stored).st_mtime_ns
    run_training(TrainRunConfig(max_steps=3, resume_from=half.final_checkpoint, **common), echo=said.append)
    assert os.stat(stored).st_mtime_ns == stamp
    assert any("LTE locality references: reading" in line for line in said)


def test_cli_resume_with_references_of_another_backbone_is_one_error_line(tmp_path):
    """The stored references name another backbone (as after a resume with other --model_path weights):
    train_vllm_editor.py exits 2 with one `error:` line naming the folder, no traceback."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from runs.training import TrainRunConfig, run_training
    from toyworld.world import generate_toyworld

    generate_toyworld(tmp_path / "data" / "toyworld", n_train=8, n_eval=4, n_pretrain_scenes=2)
    first = run_training(TrainRunConfig(editor_name=NAME, model_name="tiny-blip2", data_name="TOY", batch_size=4,
                                        seed=3, max_steps=1, data_dir=str(tmp_path / "data"),
                                        records_dir=str(tmp_path / "runs")), echo=None)
    manifest = os.path.join(first.run_dir, FOLDER, MANIFEST)
    with open(manifest) as f:
        content = json.load(f)
    content["backbone"]["weights_digest"] = "0" * 16
    with open(manifest, "w") as f:
        json.dump(content, f)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_vllm_editor.py"), "-en", NAME, "-mn", "tiny-blip2",
                           "-dna", "TOY", "-bs", "4", "-rs", "3", "--max_steps", "2", "--data_dir", str(tmp_path / "data"),
                           "-lkpt", first.final_checkpoint], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and FOLDER in errors[0] and "another backbone" in errors[0], proc.stderr
