"""Checks shared by the FFN-editing baselines' tests (LEMoE-VL, WISE): real behaviour on tiny backbones."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import yaml

from editors import default_config_path, editor_class, load_editor
from utils.config import load_config
from utils.errors import UserError
from utils.records import Sample

REAL_TO_TINY = {"blip2-opt-2.7b": "tiny-blip2", "llava-v1.5-7b": "tiny-llava", "minigpt-4-vicuna-7b": "tiny-minigpt4"}


def toy_world(root) -> str:
    """A small toy world under `root`/toyworld; returns `root` (the --data_dir)."""
    from toyworld.world import generate_toyworld

    generate_toyworld(root / "toyworld", n_train=2, n_eval=4, n_pretrain_scenes=2)
    return str(root)


def toy_records(data_dir: str):
    from utils.data import load_edit_dataset

    world = os.path.join(data_dir, "toyworld")
    return load_edit_dataset("TOY", os.path.join(world, "eval.json"), world)


@torch.no_grad()
def logits(vllm, samples: list[Sample]) -> torch.Tensor:
    batch = vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])
    return vllm(batch)  # [b, l, V]


@torch.no_grad()
def target_accuracy(vllm, sample: Sample) -> float:
    batch = vllm.prepare([sample.prompt], [sample.image], [sample.target])
    picked = vllm(batch)[batch.label_mask].argmax(-1)
    return (picked == batch.labels[batch.label_mask]).float().mean().item()


def parameters(vllm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vllm.state_dict().items()}


def assert_backbone_unchanged(vllm, params: dict[str, torch.Tensor]) -> None:
    now = vllm.state_dict()
    assert set(now) == set(params) and all(torch.equal(now[k], params[k]) for k in params)


def editor_on(name: str, vllm, **overrides):
    """Editor `name` built from its tiny config with some fields replaced (validated like the YAML)."""
    cls = editor_class(name)
    config = load_config(cls.config_class, default_config_path(name, vllm.name))
    return cls(vllm, dataclasses.replace(config, **overrides))


def check_real_configs(name: str, paper_layer: int) -> None:
    """Each real backbone's config builds the editor on a real-shape tiny folder (32 layers, the real
    layout, loaded by the real name)."""
    from conftest import real_shape_backbone

    for real, tiny in REAL_TO_TINY.items():
        cfg = load_config(editor_class(name).config_class, default_config_path(name, real))
        assert cfg.layer == paper_layer
        vllm = real_shape_backbone(real, tiny, num_layers=32, hidden_size=32, vision_hidden_size=32)
        editor = editor_class(name)(vllm, cfg)
        try:
            assert editor.layer == paper_layer
        finally:
            editor.remove()


def check_bad_config(name: str, key: str, value, tmp_path) -> None:
    """A bad value in the YAML is one UserError that names the key."""
    with open(default_config_path(name, "tiny-blip2")) as f:
        data = yaml.safe_load(f)
    data[key] = value
    path = tmp_path / f"{name}-bad.yaml"
    path.write_text(yaml.safe_dump(data))
    from conftest import tiny_vllm

    with pytest.raises(UserError, match=key):
        load_editor(name, tiny_vllm("tiny-blip2"), str(path))


def check_cli(name: str, tmp_path) -> None:
    """`test_vllm_edit.py -en <name> -mn tiny-blip2 -dn TOY -sen 2 -dsn 4` runs and returns 0."""
    import test_vllm_edit

    data_dir = toy_world(tmp_path / "data")
    rc = test_vllm_edit.main(["-en", name, "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "2", "-dsn", "4",
                              "--no_progress", "--data_dir", data_dir, "--results_dir", str(tmp_path / "res")])
    assert rc == 0
    assert os.path.isfile(tmp_path / "res" / name / "tiny-blip2" / "TOY" / "sequential_edit_2" / "mean_results.json")
