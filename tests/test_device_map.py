"""`--device_map`: one backbone over several devices of one process (docs/DISTRIBUTED.md).

A split over two devices cannot be made on a CPU-only machine (torch has one CPU device), so the
placement logic is tested piece by piece: which device a map gives each layer, `device_of_layer`
reading where a layer really sits, LiveEdit's modules following layer l_e, the checks of a map, the
CPU fallback of `auto`, and whole loads through transformers' and accelerate's device-map code
(every module on the CPU) giving the logits of a plain load.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from editors import load_editor
from editors.vllms import load_vllm, save_vllm
from editors.vllms.blip2 import BLIP2
from editors.vllms.placement import check_module_names, planned_device
from runs.eval_config import EvalConfig
from runs.train_config import TrainRunConfig
from utils.devices import parse_device_map
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = "language_model.model.decoder.layers"  # BLIP-2's decoder layers inside `vllm.model`


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("blip2"))
    save_vllm(load_vllm("tiny-blip2"), folder)
    return folder


def write_map(tmp_path, mapping, name="map.json") -> str:
    path = str(tmp_path / name)
    with open(path, "w") as f:
        json.dump(mapping, f)
    return path


def logits_of(vllm) -> torch.Tensor:
    from tests.conftest import make_image

    batch = vllm.prepare(["what is in the picture", "a text-only question"], [make_image(1), None],
                         ["a red cube", "yes"])
    return vllm(batch)


# ---- which device a map gives each layer ------------------------------------------------------------

def test_a_map_assigns_each_layer_the_device_of_its_longest_key(blip2_folder):
    model = BLIP2.meta_model(blip2_folder)
    device_map = {"": "cpu", f"{LAYER}.1": "cuda:1", "language_model.lm_head": "cuda:1"}
    check_module_names(model, device_map, "--device_map")  # every weight covered, every key a module
    assert planned_device(f"{LAYER}.0.fc1.weight", device_map) == "cpu"
    assert planned_device(f"{LAYER}.1", device_map) == "cuda:1"
    assert planned_device(f"{LAYER}.1.self_attn.q_proj.weight", device_map) == "cuda:1"
    assert planned_device(f"{LAYER}.10", device_map) == "cpu"  # a prefix of the name, not of the module path
    assert planned_device("vision_model.embeddings.patch_embedding.weight", device_map) == "cpu"


def test_a_map_naming_no_such_module_or_leaving_weights_out_is_refused(blip2_folder):
    model = BLIP2.meta_model(blip2_folder)
    with pytest.raises(UserError, match="'language_model.decoder' is not a module"):
        check_module_names(model, {"": "cpu", "language_model.decoder": "cpu"}, "--device_map")
    with pytest.raises(UserError, match="no device for the weight .qformer"):
        check_module_names(model, {"vision_model": "cpu", "query_tokens": "cpu", "language_model": "cpu"},
                           "--device_map")


def test_device_of_layer_reads_where_each_layer_sits_and_liveedit_follows_layer_le():
    vllm = load_vllm("tiny-llava")  # a fresh copy: its edited layer is moved below
    le = load_editor("liveedit", vllm).config.edit_layer_i
    vllm.layers[le].to("meta")  # a second device this machine has (shapes only): enough to see placement
    assert vllm.device_of_layer(le) == torch.device("meta")
    assert {vllm.device_of_layer(i) for i in range(vllm.num_layers) if i != le} == {torch.device("cpu")}
    assert vllm.device == torch.device("cpu")  # inputs still go to the embeddings' device
    editor = load_editor("liveedit", vllm)
    for name, module in editor.trainable_modules().items():
        assert {p.device.type for p in module.parameters()} == {"meta"}, name
    assert editor.repository.device == torch.device("meta")


# ---- the flag's values ----------------------------------------------------------------------------

def test_flag_values(tmp_path):
    assert parse_device_map(None) is None and parse_device_map("none") is None
    assert parse_device_map("auto") == "auto"
    path = write_map(tmp_path, {"": "CPU"})
    assert parse_device_map(path) == {"": "cpu"}
    assert EvalConfig(sequential_edit_n=1, editor_name="ft_l", model_name="tiny-blip2").device_map == "none"


@pytest.mark.parametrize("mapping, words", [
    ({"": "cuda:7"}, ["cuda:7", "does not exist"] if torch.cuda.is_available() else ["cuda:7", "no CUDA GPU"]),
    ({"language_model": "disk"}, ["'language_model'", "'disk'", "offloading"]),
    ({"vision_model": 1.5}, ["'vision_model'", "1.5"]),
    ({}, ["empty"]),
])
def test_a_bad_map_file_is_one_error_naming_file_module_and_device(tmp_path, mapping, words):
    path = write_map(tmp_path, mapping)
    with pytest.raises(UserError) as info:
        TrainRunConfig(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY", batch_size=1,
                       device_map=path)
    message = str(info.value)
    assert message.startswith("--device_map ") and path in message
    for word in words:
        assert word in message


def test_a_missing_or_corrupt_map_file_names_it(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        parse_device_map(str(tmp_path / "absent.json"))
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{\"\": ")
    with pytest.raises(UserError, match="corrupt.json is empty or corrupt"):
        parse_device_map(str(corrupt))


def test_cli_map_naming_an_absent_gpu_exits_2_with_one_error_line(tmp_path):
    path = write_map(tmp_path, {"": "cpu", "language_model": "cuda:5"})
    proc = subprocess.run([sys.executable, "test_vllm_edit.py", "-en", "ft_l", "-mn", "tiny-blip2", "-sen", "1",
                           "-dn", "TOY", "--device_map", path, "--results_dir", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cuda:5" in lines[0] and "'language_model'" in lines[0] and path in lines[0]
    assert not os.path.exists(tmp_path / "out")


# ---- whole loads ------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback of auto")
def test_auto_without_cuda_falls_back_to_the_device_with_a_note(blip2_folder):
    notes = []
    plain, auto = load_vllm("tiny-blip2", blip2_folder), load_vllm("tiny-blip2", blip2_folder, device_map="auto",
                                                                     say=notes.append)
    assert len(notes) == 1 and "no CUDA GPU" in notes[0] and "cpu" in notes[0]
    assert auto.device == auto.device_of_layer(0) == torch.device("cpu")
    assert torch.equal(logits_of(plain), logits_of(auto))


def test_a_map_file_loads_through_transformers_with_the_logits_of_a_plain_load(blip2_folder, tmp_path):
    path = write_map(tmp_path, {"vision_model": "cpu", "qformer": "cpu", "query_tokens": "cpu",
                                "language_projection": "cpu", "language_model": "cpu"})
    plain, placed = load_vllm("tiny-blip2", blip2_folder), load_vllm("tiny-blip2", blip2_folder, device_map=path)
    assert torch.equal(logits_of(plain), logits_of(placed))
    bad = write_map(tmp_path, {"": "cpu", "language_model.decoder": "cpu"}, "bad.json")
    with pytest.raises(UserError, match="'language_model.decoder' is not a module"):
        load_vllm("tiny-blip2", blip2_folder, device_map=bad)


def test_a_map_places_an_assembled_backbone_through_accelerate(tmp_path):
    folder = str(tmp_path / "minigpt4")
    save_vllm(load_vllm("tiny-minigpt4"), folder)
    path = write_map(tmp_path, {"visual_encoder": "cpu", "Qformer": "cpu", "query_tokens": "cpu",
                                "llama_proj": "cpu", "llama_model": "cpu"})
    plain, placed = load_vllm("tiny-minigpt4", folder), load_vllm("tiny-minigpt4", folder, device_map=path)
    assert placed.device_map["query_tokens"] == "cpu"
    assert torch.equal(logits_of(plain), logits_of(placed))


def test_liveedit_edits_the_same_on_a_placed_backbone(blip2_folder, tmp_path):
    from tests.conftest import make_image
    from utils.records import Sample

    path, image = write_map(tmp_path, {"": "cpu"}), str(tmp_path / "cube.png")
    make_image(1).save(image)
    outputs = []
    for device_map in (None, path):
        torch.manual_seed(0)
        editor = load_editor("liveedit", load_vllm("tiny-blip2", blip2_folder, device_map=device_map))
        editor.edit([Sample(prompt="what is in the picture", target="a red cube", image=image)])
        outputs.append(logits_of(editor.vllm))
    assert torch.equal(outputs[0], outputs[1])


def test_device_map_under_torchrun_is_refused_before_joining(monkeypatch):
    from runs import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--device_map auto cannot be combined with torchrun"):
        distributed.check_device_map("auto")
    distributed.check_device_map("none")  # the default is fine under torchrun
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_device_map("auto")
