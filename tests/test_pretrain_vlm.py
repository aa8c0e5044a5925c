"""Pretraining the processor-driven tiny backbones (tiny-qwen2.5-vl: patch sequences with grids, a
variable number of image tokens per picture) and the paper families' pretraining left bit-identical."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT
from editors.vllms import TinySpec, load_vllm
from editors.vllms.tiny_vlm import build_tiny_vlm
from runs import pretrain as P
from test_pretrain import short_cfg, world  # noqa: F401  (the same small world and short config)
from toyworld.world import read_manifest

QWEN = "tiny-qwen2.5-vl"




# The paper families' default cache keys, recorded at commit 4d846d1 (before processor-driven backbones could
# be pretrained): a hash of the config and the world's arguments, the same on any machine.
PAPER_FAMILIES = {"tiny-blip2": "196e55f1b8", "tiny-llava": "1a754526e6", "tiny-minigpt4": "465d7a5ab5"}
BASE_COMMIT = "4d846d105721d9a90419d701335aa666ecfe83eb"


@pytest.fixture(scope="module")
def old_pretrain():
    """runs/pretrain.py as it was at BASE_COMMIT (read from git), importable beside today's."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the pretraining code before this change cannot be read")
    shown = subprocess.run(["git", "-C", ROOT, "show", f"{BASE_COMMIT}:runs/pretrain.py"], capture_output=True, text=True)
    if shown.returncode:
        pytest.skip(f"no git history of {BASE_COMMIT[:7]} in this checkout: {shown.stderr.strip()}")
    name = "old_pretrain_4d846d1"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(shown.stdout, f"{BASE_COMMIT[:7]}:runs/pretrain.py", "exec"), module.__dict__)
    yield module
    del sys.modules[name]


@pytest.mark.parametrize("name", sorted(PAPER_FAMILIES))
def test_paper_families_pretrain_bit_identical(world, old_pretrain, name):
    """The paper families pretrain to the same weights as the code before the change (computed here, so
    on any CPU), and keep their cache keys."""
    short = dict(spec=TinySpec(vision_init_std=0.05), vision_steps=6, vision_batch=8, steps=6, batch_images=4,
                 text_rows=2, warmup=2)
    assert P.cache_key(name, read_manifest(world), P.config_for(name)) == PAPER_FAMILIES[name]
    new = P.pretrain_tiny(name, world, P.config_for(name, **short), progress=False).model.state_dict()
    old = old_pretrain.pretrain_tiny(name, world, old_pretrain.config_for(name, **short), progress=False).model.state_dict()
    assert new.keys() == old.keys()
    assert all(torch.equal(new[k], old[k]) for k in new)


def test_patch_bank_fast_inputs_equal_the_processor_path(world):
    """The memoised rows, the bank's patches and one encoding per picture build exactly the batch
    that `prepare` builds from the image files (ids, embeddings, M-RoPE positions, spans, labels)."""
    vllm = build_tiny_vlm(QWEN, TinySpec(vision_init_std=0.05))
    w = P._load_world(world)
    bank = P._bank(vllm, w.images)
    assert isinstance(bank, P._PatchBank) and len(bank.pixels) == len(w.images)
    picks = [0, 3, 0, None, 5]  # a picture twice, a text-only row
    prompts = [w.questions[i][sorted(w.questions[i])[0]][0][0] if i is not None else w.text[0][0] for i in picks]
    targets = [w.questions[i][sorted(w.questions[i])[0]][0][1] if i is not None else w.text[0][1] for i in picks]
    with torch.no_grad():
        want = vllm.prepare(prompts, [w.images[i] if i is not None else None for i in picks], targets)
        seen: dict = {}
        with bank.inputs(None, seen):
            got = vllm.prepare(prompts, picks, targets)
            again = vllm.prepare(prompts, picks, targets)  # from the memo
    assert seen["indices"].tolist() == [0, 3, 5] and len(seen["features"]) == 3
    for f in dataclasses.fields(want):
        a, b, c = (getattr(x, f.name) for x in (want, got, again))
        if a is None:
            assert b is None and c is None, f.name
        else:
            assert torch.equal(a, b) and torch.equal(a, c), f.name
    assert not {"_row", "_features", "_positions"} & set(vars(vllm))  # the block leaves nothing patched


def test_param_groups_put_qwens_merger_in_the_bridge():
    vllm = build_tiny_vlm(QWEN)
    groups = P.param_groups(vllm)
    names = {id(p): n for n, p in vllm.model.named_parameters()}
    assert all(names[id(p)].startswith("model.visual.merger.") for p in groups["bridge"]) and groups["bridge"]
    assert all(names[id(p)].startswith("model.visual.") for p in groups["vision"]) and groups["vision"]
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(vllm.model.parameters()))


def test_qwen_short_run_learns_caches_and_reloads(world, tmp_path):
    losses = []
    cfg = short_cfg(QWEN)
    vllm = P.pretrain_tiny(QWEN, world, cfg, progress=False, callback=lambda step, loss, _: losses.append(loss))
    aux, lm = losses[:cfg.vision_steps], losses[cfg.vision_steps:]
    assert sum(aux[-3:]) / 3 < sum(aux[:3]) / 3  # phase 1: the heads on the variable-length features learn
    assert sum(lm[-5:]) / 5 < 0.7 * sum(lm[:3]) / 3  # phase 2: the question / fact loss falls
    assert not any(p.requires_grad for p in vllm.model.parameters())
    assert not {"_row", "_features", "_positions", "_tokenize"} & set(vars(vllm))
    assert not P._vision_encoder(vllm)._forward_hooks

    small = short_cfg(QWEN, vision_steps=2, steps=2)
    out = P.ensure_pretrained(QWEN, world, str(tmp_path), small, progress=False)
    report = json.load(open(os.path.join(out, "pretrain_report.json")))
    assert report["name"] == QWEN and set(report["eval_accuracy"]) == {"image_loc", "text_loc", "pred", "alt"}
    again = P.pretrain_tiny(QWEN, world, small, progress=False)  # same seed, same model
    loaded = load_vllm(QWEN, out)
    assert loaded.name == QWEN
    image = os.path.join(world, json.load(open(os.path.join(world, "eval.json")))[0]["image"])
    prompts, targets = ["what color is the shape? The answer is:", "nq question: what is x?"], ["red", "pomox"]
    with torch.no_grad():
        want = again(again.prepare(prompts, [image, None], targets))
        got = loaded(loaded.prepare(prompts, [image, None], targets))
    assert torch.equal(want, got)


def test_cli_accepts_the_processor_driven_names(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        P.main(["--names", "tiny-nope", "--world", str(tmp_path / "w")])
    assert exc.value.code == 2 and QWEN in capsys.readouterr().err  # argparse lists it as a choice
