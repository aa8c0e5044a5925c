"""Checks every baseline editor's tests share: logits, parameters, real-depth configs, the CLI."""
from __future__ import annotations

import os

import torch

from conftest import ROOT
from editors import load_editor
from utils.config import load_config
from utils.errors import UserError
from utils.records import Sample

REAL = {"blip2-opt-2.7b": "tiny-blip2", "llava-v1.5-7b": "tiny-llava", "minigpt-4-vicuna-7b": "tiny-minigpt4"}


@torch.no_grad()
def logits(vllm, samples: list[Sample]) -> torch.Tensor:
    """Logits [b, l, V] of `samples` as one right-padded batch."""
    return vllm(vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples]))


@torch.no_grad()
def target_accuracy(vllm, sample: Sample) -> float:
    """Teacher-forced token accuracy of `sample`'s target."""
    batch = vllm.prepare([sample.prompt], [sample.image], [sample.target])
    predicted = vllm(batch)[batch.label_mask].argmax(-1)  # [n]
    return (predicted == batch.labels[batch.label_mask]).float().mean().item()


def parameters(vllm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in vllm.state_dict().items()}


def same_parameters(vllm, saved: dict[str, torch.Tensor]) -> bool:
    now = vllm.state_dict()
    return now.keys() == saved.keys() and all(torch.equal(now[k], v) for k, v in saved.items())


def config_error(editor_name: str, tmp_path, text: str) -> str:
    """The UserError message of loading an editor config whose YAML is `text`."""
    cls = __import__("editors").editor_class(editor_name)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    try:
        load_config(cls.config_class, str(path))
    except UserError as exc:
        return str(exc)
    raise AssertionError(f"{text!r} was accepted")


def build_on_real_depth(editor_name: str) -> dict[str, int]:
    """Each real backbone's config built on a real-shape tiny folder of the same family (32 layers,
    the real layout, loaded by the real name); returns real name -> the editor's resolved layer index."""
    from conftest import real_shape_backbone

    layers = {}
    for real, tiny in REAL.items():
        vllm = real_shape_backbone(real, tiny, num_layers=32, hidden_size=32, vision_layers=1)
        editor = load_editor(editor_name, vllm, os.path.join(ROOT, "configs", editor_name, f"{real}.yaml"))
        layers[real] = editor.layer
        editor.remove()
    return layers


def run_cli(editor_name: str, tmp_path, *extra: str) -> int:
    """`test_vllm_edit.py -en <editor> -mn tiny-blip2 -dn TOY -sen 2 -dsn 4` on a small toy world."""
    import test_vllm_edit
    from toyworld.world import generate_toyworld

    data = tmp_path / "data"
    if not (data / "toyworld").exists():
        generate_toyworld(data / "toyworld", n_train=2, n_eval=4, n_pretrain_scenes=2)
    return test_vllm_edit.main(["-en", editor_name, "-mn", "tiny-blip2", "-dn", "TOY", "-sen", "2", "-dsn", "4",
                                "--no_progress", "--data_dir", str(data), "--results_dir", str(tmp_path / "res"),
                                *extra])
