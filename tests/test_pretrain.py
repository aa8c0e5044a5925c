"""Pretraining tiny backbones on the toy world: the loss goes down, runs are reproducible, and
`ensure_pretrained` caches a folder that `load_vllm` reloads exactly (short runs on a tiny world)."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from conftest import TINY
from editors.vllms import TinySpec, load_vllm
from runs import pretrain as P
from toyworld.world import generate_toyworld

FAMILY = {"tiny-blip2": "blip2", "tiny-llava": "llava", "tiny-minigpt4": "minigpt4"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "toyworld"
    generate_toyworld(out, n_train=2, n_eval=6, seed=0, n_pretrain_scenes=8, n_facts=4)
    return str(out)


def short_cfg(name: str, **changes) -> P.PretrainConfig:
    """A few seconds of training: the small default TinySpec, few steps, small batches."""
    base = dict(spec=TinySpec(vision_init_std=0.05), vision_steps=12, vision_batch=8, steps=30,
                batch_images=4, text_rows=2, warmup=5, lr=3e-3, vision_lr=3e-3)
    return P.config_for(name, **{**base, **changes})


@pytest.mark.parametrize("name", TINY)
def test_short_run_lowers_the_loss(world, name):
    losses = []
    cfg = short_cfg(name)
    vllm = P.pretrain_tiny(name, world, cfg, progress=False, callback=lambda step, loss, _: losses.append(loss))
    assert len(losses) == cfg.vision_steps + cfg.steps
    aux, lm = losses[:cfg.vision_steps], losses[cfg.vision_steps:]
    assert sum(aux[-3:]) / 3 < sum(aux[:3]) / 3  # phase 1: the auxiliary heads learn
    assert sum(lm[-5:]) / 5 < 0.7 * sum(lm[:3]) / 3  # phase 2: the question / fact loss falls
    assert not any(p.requires_grad for p in vllm.model.parameters())
    acc = P.toy_accuracy(vllm, world)
    assert set(acc) == {"image_loc", "text_loc", "pred", "alt"} and all(0 <= v <= 1 for v in acc.values())
    # No hook or patched method survives training.
    assert not {"pixel_values", "encode_images", "_tokenize"} & set(vars(vllm))
    assert not P._vision_encoder(vllm)._forward_hooks


def test_same_seed_same_weights(world):
    cfg = short_cfg("tiny-minigpt4", vision_steps=4, steps=4)
    a = P.pretrain_tiny("tiny-minigpt4", world, cfg, progress=False).model.state_dict()
    b = P.pretrain_tiny("tiny-minigpt4", world, cfg, progress=False).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = P.pretrain_tiny("tiny-minigpt4", world, P.config_for("tiny-minigpt4", **{**vars(cfg), "seed": 1}),
                        progress=False).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_param_groups_split_every_weight_once():
    for name in TINY:
        vllm = P.build_tiny(name)
        groups = P.param_groups(vllm)
        assert all(groups.values())
        ids = [id(p) for ps in groups.values() for p in ps]
        assert len(ids) == len(set(ids)) == len(list(vllm.model.parameters()))


@pytest.mark.parametrize("name", TINY)
def test_ensure_pretrained_caches_and_reloads(world, name, tmp_path, monkeypatch):
    trained = {}
    real = P.pretrain_tiny

    def spy(*args, **kwargs):
        trained["vllm"] = real(*args, **kwargs)
        return trained["vllm"]

    monkeypatch.setattr(P, "pretrain_tiny", spy)
    cfg = short_cfg(name, vision_steps=3, steps=3)
    out = P.ensure_pretrained(name, world, str(tmp_path), cfg, progress=False)
    assert os.path.basename(out).startswith(name + "-") and "vllm" in trained
    report = json.load(open(os.path.join(out, "pretrain_report.json")))
    assert report["name"] == name and report["config"]["steps"] == 3
    assert set(report["eval_accuracy"]) == {"image_loc", "text_loc", "pred", "alt"}
    assert sorted(os.listdir(os.path.join(str(tmp_path), "pretrained"))) == [os.path.basename(out)]  # no temp left

    def fail(*args, **kwargs):
        raise AssertionError("trained again although cached")

    monkeypatch.setattr(P, "pretrain_tiny", fail)
    assert P.ensure_pretrained(name, world, str(tmp_path), cfg, progress=False) == out
    with pytest.raises(AssertionError):  # another config is another model
        P.ensure_pretrained(name, world, str(tmp_path), short_cfg(name, vision_steps=3, steps=4), progress=False)

    loaded = load_vllm(FAMILY[name], out)
    assert loaded.name == name
    prompts = ["what color is the shape? The answer is:", "nq question: what is the capital of x?"]
    image = os.path.join(world, json.load(open(os.path.join(world, "eval.json")))[0]["image"])
    with torch.no_grad():
        want = trained["vllm"](trained["vllm"].prepare(prompts, [image, None], ["red", "pomox"]))
        got = loaded(loaded.prepare(prompts, [image, None], ["red", "pomox"]))
    assert torch.equal(want, got)


def test_the_world_version_picks_the_recipe(tmp_path):
    """Version 4's tiny-blip2 (24,000 phase-1 steps) and tiny-minigpt4 (6,000) get the finer vision tower
    (WORLD_OVERRIDES), tiny-llava the wider one with its 8-px patches; version 3 (the demo's) keeps the
    defaults; a folder's manifest says which version it is."""
    default = P.config_for("tiny-blip2")
    assert P.config_for("tiny-blip2", 3) == default and P.config_for("tiny-llava", 3) == P.config_for("tiny-llava")
    llava = P.config_for("tiny-llava", 4)
    assert (llava.spec.patch_size, llava.spec.vision_hidden_size, llava.spec.vision_layers, llava.vision_steps) == \
        (P.config_for("tiny-llava").spec.patch_size, 128, 4, 6000)
    v4 = P.config_for("tiny-blip2", 4)
    assert (v4.spec.patch_size, v4.spec.vision_hidden_size, v4.spec.vision_layers, v4.vision_steps) == (4, 128, 4, 24000)
    minigpt4 = P.config_for("tiny-minigpt4", 4)   # the same tower, 6,000 phase-1 steps (LIFELONG.md section 11)
    assert minigpt4 == dataclasses.replace(v4, vision_steps=6000)
    assert P.config_for("tiny-minigpt4", 3) == P.config_for("tiny-minigpt4")
    assert v4.spec.hidden_size == default.spec.hidden_size and v4.steps == default.steps
    assert P.config_for("tiny-blip2", 4, vision_steps=7).vision_steps == 7   # explicit changes still win
    assert P.recipe_key(v4) != P.recipe_key(default)
    world = str(tmp_path / "none")
    assert P.config_for_world("tiny-blip2", world) == default   # no manifest: the defaults
