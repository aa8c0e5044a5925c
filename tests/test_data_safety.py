"""Bad inputs refused up front, naming what to fix (issue "Real checkpoints and real runs", items 16-18, 21).

- image paths that leave the image root (item 16);
- empty, corrupt and oversized images, found by reading every header when a split loads (item 17);
- prompt + target longer than the backbone's positions, refused before training / evaluation (item 18);
- devices, seeds and editor config values out of range (item 21).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

import utils.images as images_module
from conftest import ROOT, tiny_vllm
from runs.data import check_lengths, load_split
from utils.config import load_config
from utils.data import load_edit_dataset
from utils.devices import resolve_device
from utils.errors import UserError
from utils.images import MAX_IMAGE_PIXELS, image_header_problem, load_image

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}


def make_record(i: int, **overrides) -> dict:
    """One E-VQA (MMEdit schema) record whose images live under imgs/."""
    record = {"src": f"What colour is object {i}?", "pred": f"blue{i}", "rephrase": f"Which colour has object {i}?",
              "alt": f"red{i}", "image": f"imgs/edit_{i}.png", "image_rephrase": f"imgs/rephrase_{i}.png",
              "loc": f"who wrote book {i}", "loc_ans": f"author {i}", "m_loc": f"imgs/loc_{i}.png",
              "m_loc_q": f"How many cats in picture {i}?", "m_loc_a": f"{i + 1}"}
    record.update(overrides)
    return record


def evqa_data_dir(root, records) -> tuple[str, str, str]:
    """An EVQA data folder (the paper's layout) holding `records` and a small PNG per image path.

    Returns (data_dir, json_path, image_root)."""
    data_dir = root / "data"
    image_root = data_dir / "easy-edit-mm" / "images"
    json_path = data_dir / "easy-edit-mm" / "vqa" / "vqa_eval.json"
    json_path.parent.mkdir(parents=True)
    json_path.write_text(json.dumps(records), encoding="utf-8")
    for record in records:
        for field in ("image", "image_rephrase", "m_loc"):
            target = image_root / record[field]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (10, 20, 30)).save(target)
    return str(data_dir), str(json_path), str(image_root)


# ---- item 16: image paths stay inside the image root ------------------------------------------------

@pytest.mark.parametrize("check_images", [True, False])
def test_image_paths_outside_the_root_are_refused_naming_record_field_and_path(tmp_path, check_images):
    secret = tmp_path / "secret.png"  # a real file outside the root: the old reader would have used it
    Image.new("RGB", (4, 4)).save(secret)
    records = [make_record(0), make_record(1, image="../secret.png"),
               make_record(2, m_loc=str(secret)), make_record(3, image_rephrase="imgs/../../secret.png"),
               make_record(4, image="imgs/./sub/../edit_4.png")]  # stays inside: fine
    _, json_path, image_root = evqa_data_dir(tmp_path, [make_record(i) for i in range(5)])
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    with pytest.raises(UserError) as info:
        load_edit_dataset("EVQA", json_path, image_root, check_images=check_images)
    message = str(info.value)
    assert json_path in message and "3 problem(s)" in message
    assert "record 1, field 'image': path '../secret.png' leaves the image root" in message
    assert f"record 2, field 'm_loc': path '{secret}' is absolute" in message
    assert "record 3, field 'image_rephrase': path 'imgs/../../secret.png' leaves the image root" in message
    assert "record 4" not in message and "record 0" not in message


def test_a_symlink_inside_the_root_may_point_elsewhere(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(elsewhere / "shared.png")
    data_dir, _, image_root = evqa_data_dir(tmp_path, [make_record(0)])
    os.remove(os.path.join(image_root, "imgs", "loc_0.png"))
    os.symlink(elsewhere / "shared.png", os.path.join(image_root, "imgs", "loc_0.png"))
    _, (record,) = load_split("EVQA", "eval", data_dir)
    assert load_image(record.locality["image_loc"][0].image).getpixel((0, 0)) == (200, 0, 0)


# ---- item 17: every image header is read when a split loads ---------------------------------------

def png_with_header(path, width: int, height: int) -> None:
    """A PNG that declares `width` x `height` pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_empty_corrupt_and_oversized_images_are_listed_in_one_error_before_the_run(tmp_path):
    data_dir, json_path, image_root = evqa_data_dir(tmp_path, [make_record(i) for i in range(4)])
    imgs = tmp_path / "data" / "easy-edit-mm" / "images" / "imgs"
    (imgs / "edit_0.png").write_bytes(b"")
    (imgs / "rephrase_1.png").write_bytes(b"this is not an image")
    whole = (imgs / "loc_2.png").read_bytes()
    (imgs / "loc_2.png").write_bytes(whole[:len(whole) // 2])
    png_with_header(imgs / "edit_3.png", 10_000, 10_000)            # over 8192 x 8192, under Pillow's 2x error
    png_with_header(imgs / "rephrase_3.png", 40_000, 40_000)        # over Pillow's own bomb limit
    with pytest.raises(UserError) as info:
        load_split("EVQA", "eval", data_dir)
    message = str(info.value)
    assert "5 of 12 images" in message and json_path in message
    lines = message.splitlines()
    assert any(str(imgs / "edit_0.png") in line and "empty (0 bytes)" in line for line in lines)
    assert any(str(imgs / "rephrase_1.png") in line and "not an image" in line for line in lines)
    assert any(str(imgs / "loc_2.png") in line and ("corrupt" in line or "not an image" in line) for line in lines)
    assert any(str(imgs / "edit_3.png") in line and "10000 x 10000" in line for line in lines)
    assert "and 0 more" not in message
    # the decoder refuses the same files with the same limit
    assert MAX_IMAGE_PIXELS == 8192 * 8192
    with pytest.raises(UserError, match="over the limit"):
        load_image(imgs / "edit_3.png")
    assert "pixel limit" in image_header_problem(imgs / "rephrase_3.png")


def test_each_image_header_is_read_once_and_again_after_the_file_changes(tmp_path, monkeypatch):
    records = [make_record(i, m_loc="imgs/shared.png") for i in range(3)]
    data_dir, _, image_root = evqa_data_dir(tmp_path, records)
    opened = []
    real_open = Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images_module.Image, "open", counting_open)
    load_split("EVQA", "eval", data_dir)
    assert len(opened) == len(set(opened)) == 7  # 3 edit + 3 rephrase + 1 shared locality image
    load_split("EVQA", "eval", data_dir)
    assert len(opened) == 7
    os.remove(os.path.join(image_root, "imgs", "shared.png"))
    Image.new("RGB", (9, 9)).save(os.path.join(image_root, "imgs", "shared.png"))
    load_split("EVQA", "eval", data_dir)
    assert len(opened) == 8


# ---- item 18: too long for the backbone's positions ------------------------------------------------

LONG = " ".join(f"zq{i}x" for i in range(300))  # far more than tiny models' 256 positions


def test_check_lengths_names_the_records_that_do_not_fit(tmp_path):
    vllm = tiny_vllm("tiny-blip2")
    raw = [make_record(i) for i in range(6)]
    raw[2]["src"] = "Describe " + LONG
    raw[4]["loc"] = LONG
    path = tmp_path / "edits.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    records = load_edit_dataset("EVQA", str(path), str(tmp_path), check_images=False)
    check_lengths(vllm, records[:2])  # short records pass
    with pytest.raises(UserError) as info:
        check_lengths(vllm, records)
    message = str(info.value)
    limit = vllm.stack.config.max_position_embeddings
    assert "2 record(s)" in message and f"limit of {limit} positions" in message
    assert "record 2 (request)" in message and "record 2 (image_rephrase)" in message
    assert "record 4 (text_loc)" in message
    assert "record 0" not in message and "record 3" not in message


@pytest.fixture(scope="module")
def long_toy_data(tmp_path_factory):
    """A toy world whose eval record 1 and train record 2 are too long for a tiny backbone."""
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("longdata")
    world = root / "toyworld"
    generate_toyworld(str(world), n_train=4, n_eval=3, n_pretrain_scenes=2)
    for name, index, field in (("eval.json", 1, "m_loc_q"), ("train.json", 2, "rephrase")):
        records = json.loads((world / name).read_text(encoding="utf-8"))
        records[index][field] = LONG
        (world / name).write_text(json.dumps(records), encoding="utf-8")
    return str(root)


def test_evaluation_refuses_too_long_records_before_it_starts(long_toy_data, tmp_path):
    from runs.eval_config import EvalConfig
    from runs.eval_run import run_evaluation

    results = tmp_path / "results"
    cfg = EvalConfig(sequential_edit_n=1, editor_name="ft_l", model_name="tiny-blip2", data_name="TOY",
                     data_dir=long_toy_data, results_dir=str(results), show_progress=False)
    with pytest.raises(UserError, match=r"record 1 \(image_loc\)"):
        run_evaluation(cfg)
    assert not results.exists()


def test_training_refuses_too_long_records_before_it_starts(long_toy_data, tmp_path):
    from runs.train_config import TrainRunConfig
    from runs.training import run_training

    runs = tmp_path / "records"
    cfg = TrainRunConfig(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY", batch_size=2,
                         data_dir=long_toy_data, records_dir=str(runs), max_steps=1, seed=0)
    with pytest.raises(UserError, match=r"record 2 \(text_rephrase\)"):
        run_training(cfg, echo=None)
    assert not runs.exists()


# ---- item 21: devices, seeds, editor config values --------------------------------------------------

@pytest.mark.parametrize("name,words", [("meta", "holds no data"), ("mps", "no MPS device"),
                                        ("xpu", "no XPU device"), ("hpu", "not supported")])
def test_devices_that_cannot_run_here_are_refused(name, words):
    import torch

    if name == "mps" and torch.backends.mps.is_available() or name == "xpu" and torch.xpu.is_available():
        pytest.skip(f"this machine has {name}")
    with pytest.raises(UserError, match=words):
        resolve_device(name)


def test_seeds_outside_what_numpy_and_torch_accept_are_refused():
    from runs.eval_config import EvalConfig
    from runs.train_config import TrainRunConfig

    base = dict(sequential_edit_n=1, editor_name="ft_l", model_name="tiny-blip2")
    assert EvalConfig(**base, seed=2**32 - 1).seed == 2**32 - 1
    for bad in (2**32, -1, 2**64):
        with pytest.raises(UserError, match=r"--seed must be an integer in 0\.\.4294967295"):
            EvalConfig(**base, seed=bad)
        with pytest.raises(UserError, match="-rs/--random_seed"):
            TrainRunConfig(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY", batch_size=2, seed=bad)


@pytest.mark.parametrize("section,key,value,words", [
    ("retrieval_editor", "module_dim", 100, "module_dim (100) must be divisible by cross_att_head_n (8)"),
    ("retrieval_editor", "lora_rank", 0, "lora_rank must be at least 1"),
    ("retrieval_editor", "eqe_n", 0, "eqe_n must be at least 1"),
    ("train_cfg", "lr", -1e-4, "lr must be positive"),
    ("train_cfg", "loc_lambda", -1, "loc_lambda must be 0 or more"),
    (None, "repository_dtype", "float8", "repository_dtype"),
])
def test_liveedit_config_values_are_checked_naming_file_and_key(tmp_path, section, key, value, words):
    import yaml

    from editors.liveedit.config import LiveEditConfig

    with open(os.path.join(ROOT, "configs", "liveedit", "blip2-opt-2.7b.yaml")) as f:
        data = yaml.safe_load(f)
    (data[section] if section else data)[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as info:
        load_config(LiveEditConfig, str(path))
    message = str(info.value)
    assert message.startswith(str(path) + (f".{section}" if section else "")) and words in message


@pytest.mark.parametrize("key,value,words", [("steps", 0, "steps must be at least 1"), ("lr", 0, "lr must be positive"),
                                             ("lr", -0.1, "lr must be positive")])
def test_ft_config_values_are_checked_naming_file_and_key(tmp_path, key, value, words):
    from editors.baselines.ft import FTConfig

    path = tmp_path / "ft.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(UserError, match=words) as info:
        load_config(FTConfig, str(path))
    assert str(path) in str(info.value)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("toydata")
    generate_toyworld(str(root / "toyworld"), n_train=4, n_eval=3, n_pretrain_scenes=2)
    return str(root)


@pytest.mark.parametrize("extra,words", [
    (["-dvc", "meta"], "device meta"),
    (["--seed", str(2**32)], "--seed"),
    (["--config", "BAD"], "steps must be at least 1"),
])
def test_cli_refuses_bad_device_seed_and_config_in_one_line(toy_data, tmp_path, extra, words):
    bad = tmp_path / "bad_ft.yaml"
    bad.write_text("steps: 0\n")
    extra = [str(bad) if x == "BAD" else x for x in extra]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "test_vllm_edit.py"), "-en", "ft_l", "-mn", "tiny-blip2",
                           "-dn", "TOY", "-sen", "1", "--data_dir", toy_data, "--results_dir", str(tmp_path / "r"),
                           "--no_progress", *extra], env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert words in proc.stderr and "Traceback" not in proc.stderr
    if "--config" in extra:
        assert str(bad) in proc.stderr
