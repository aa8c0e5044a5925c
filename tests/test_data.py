"""Tests for the dataset readers (`utils.data`) and image loading (`utils.images`).

The real-file tests read the public annotation files from the folder named by the environment
variable LIVEEDIT_REAL_DATA (laid out as `easy-edit-mm/{vqa,caption}/*.json` and `VLKEB/*.json`)
and skip when it is not set. Everything else uses small files written here into tmp_path.
"""
from __future__ import annotations

import functools
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

import utils.images as images_module
from utils.data import (
    ALL_DATASET_NAMES,
    DATASET_NAMES,
    REQUIRED_FIELDS,
    VLKEB_ONEHOP,
    default_data_paths,
    load_edit_dataset,
)
from utils.errors import UserError
from utils.images import ImageCache, load_image
from utils.records import GENERALITY_TYPES, LOCALITY_TYPES

ANSWER = " The answer is:"
# (name, request/generality suffix, text_loc suffix, image_loc suffix), from spec section 8.3.
SUFFIXES = {
    "EVQA": (ANSWER, "?", ANSWER),
    "EIC": ("", "?", ANSWER),
    "VLKEB": ("", "?", ANSWER),
    VLKEB_ONEHOP: ("", "?", ANSWER),
    "TOY": (ANSWER, "?", ANSWER),
}
REAL_FILES = [
    ("EVQA", "train", 6345),
    ("EVQA", "eval", 2093),
    ("EIC", "train", 2849),
    ("EIC", "eval", 1000),
    ("VLKEB", "train", 5000),
    ("VLKEB", "eval", 3174),
    (VLKEB_ONEHOP, "eval", 1278),
]
REAL_IDS = [f"{name}-{split}" for name, split, _ in REAL_FILES]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def make_record(i: int = 0, port: bool = False, **overrides) -> dict:
    """A small synthetic record whose strings all differ, so a wrong mapping shows up."""
    record = {
        "src": f"What colour is object {i}?",
        "pred": f"blue{i}",
        "rephrase": f"Which colour does object {i} have?",
        "alt": f"red{i}",
        "image": f"imgs/edit_{i}.png",
        "image_rephrase": f"imgs/rephrase_{i}.png",
        "loc": f"who wrote book {i}",
        "loc_ans": f"author {i}",
        "m_loc": f"imgs/loc_{i}.png",
        "m_loc_q": f"How many cats in picture {i}?",
        "m_loc_a": f"{i + 1}",
    }
    if port:
        record["port_new"] = [
            {"port_edit_q": f"eq{i}", "port_edit_a": f"ea{i}", "port_q": f"pq{i}", "port_a": f"pa{i}"}
        ]
    record.update(overrides)
    return record


def write_json(path, data) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def write_records(tmp_path, records, file_name="edits.json") -> str:
    return write_json(tmp_path / file_name, records)


def load_error(*args, **kwargs) -> str:
    """Run load_edit_dataset, expect a UserError, and return its message."""
    with pytest.raises(UserError) as info:
        load_edit_dataset(*args, **kwargs)
    return str(info.value)


def save_image(path, image: Image.Image, **save_kwargs) -> str:
    image.save(path, **save_kwargs)
    return str(path)


def rgb_pixels(image: Image.Image) -> list:
    assert image.mode == "RGB"
    return [tuple(int(c) for c in px) for px in np.asarray(image).reshape(-1, 3)]


# ---------------------------------------------------------------------------------------------
# Real annotation files (skipped unless LIVEEDIT_REAL_DATA names a folder)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_data_dir() -> str:
    folder = os.environ.get("LIVEEDIT_REAL_DATA")
    if not folder:
        pytest.skip("LIVEEDIT_REAL_DATA is not set (point it at the folder of real annotation files)")
    if not os.path.isdir(folder):
        pytest.skip(f"LIVEEDIT_REAL_DATA={folder} is not a folder")
    return folder


@functools.lru_cache(maxsize=None)
def _raw_json(path: str) -> list:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def real_paths(real_data_dir: str, name: str, split: str) -> str:
    json_path, _ = default_data_paths(name, split, data_dir=real_data_dir)
    if not os.path.isfile(json_path):
        pytest.skip(f"{json_path} is not present")
    return json_path


@pytest.mark.parametrize("name,split,count", REAL_FILES, ids=REAL_IDS)
def test_real_file_parses_every_record(real_data_dir, name, split, count):
    json_path = real_paths(real_data_dir, name, split)
    root = os.path.join("some", "image", "root")
    records = load_edit_dataset(name, json_path, root, check_images=False)
    assert len(records) == count
    raw = _raw_json(json_path)
    assert len(raw) == count
    for position, record in enumerate(records):
        assert record.index == position
        assert len(record.requests) == 1
        assert list(record.generality) == list(GENERALITY_TYPES)
        assert list(record.locality) == list(LOCALITY_TYPES)
        assert record.locality["text_loc"][0].image is None
        assert record.requests[0].image == os.path.join(root, raw[position]["image"])
        assert record.original_answer == raw[position]["pred"]
        if name == VLKEB_ONEHOP:
            assert record.portability, f"record {position} has no portability question"
            assert len(record.portability) == len(raw[position]["port_new"])
        else:
            assert record.portability == []


@pytest.mark.parametrize("name,split", [("EVQA", "eval"), ("EIC", "eval"), ("VLKEB", "eval"),
                                        (VLKEB_ONEHOP, "eval")])
def test_real_file_templates(real_data_dir, name, split):
    json_path = real_paths(real_data_dir, name, split)
    root = "root"
    record = load_edit_dataset(name, json_path, root, limit=1, check_images=False)[0]
    raw = _raw_json(json_path)[0]
    request_suffix, text_loc_suffix, image_loc_suffix = SUFFIXES[name]
    request = record.requests[0]
    assert request.prompt == raw["src"] + request_suffix
    assert request.target == raw["alt"]
    assert record.generality["text_rephrase"][0].prompt == raw["rephrase"] + request_suffix
    image_rephrase = record.generality["image_rephrase"][0]
    assert image_rephrase.prompt == raw["src"] + request_suffix
    assert image_rephrase.image == os.path.join(root, raw["image_rephrase"])
    text_loc = record.locality["text_loc"][0]
    assert text_loc.prompt == raw["loc"] + text_loc_suffix and text_loc.target == raw["loc_ans"]
    image_loc = record.locality["image_loc"][0]
    assert image_loc.prompt == raw["m_loc_q"] + image_loc_suffix
    assert image_loc.target == raw["m_loc_a"]
    assert image_loc.image == os.path.join(root, raw["m_loc"])
    if name == "EVQA":
        assert request.prompt.endswith("? The answer is:")
        assert text_loc.prompt.startswith("nq question: ") and text_loc.prompt.endswith("?")
    if name == "EIC":
        assert request.prompt == "a photo of"
    if name == VLKEB_ONEHOP:
        item = raw["port_new"][0]
        assert record.portability[0].prompt == item["port_q"]
        assert record.portability[0].target == item["port_a"]
        assert record.portability[0].image == request.image


@pytest.mark.parametrize("name,split,count", REAL_FILES, ids=REAL_IDS)
def test_real_file_missing_images_reported_once(real_data_dir, tmp_path, name, split, count):
    json_path = real_paths(real_data_dir, name, split)
    image_root = tmp_path / "images"
    image_root.mkdir()
    raw = _raw_json(json_path)
    unique = list(dict.fromkeys(
        os.path.join(str(image_root), r[field]) for r in raw for field in ("image", "image_rephrase", "m_loc")
    ))
    message = load_error(name, json_path, image_root, check_images=True)
    assert f"{len(unique)} of {len(unique)} images" in message
    assert json_path in message and str(image_root) in message
    for path in unique[:5]:
        assert path in message
    assert unique[5] not in message  # only the first five are listed
    assert "check_images=False" in message


# ---------------------------------------------------------------------------------------------
# Synthetic files: mapping, templates, names, limit
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_DATASET_NAMES)
def test_mapping_and_templates(tmp_path, name):
    port = name == VLKEB_ONEHOP
    path = write_records(tmp_path, [make_record(0, port=port), make_record(1, port=port)])
    root = str(tmp_path / "root")
    records = load_edit_dataset(name, path, root, check_images=False)
    request_suffix, text_loc_suffix, image_loc_suffix = SUFFIXES[name]
    second = records[1]
    assert [r.index for r in records] == [0, 1]
    assert second.original_answer == "blue1"
    req = second.requests[0]
    assert (req.prompt, req.target, req.image) == (
        "What colour is object 1?" + request_suffix, "red1", os.path.join(root, "imgs/edit_1.png"))
    text_rephrase = second.generality["text_rephrase"][0]
    assert (text_rephrase.prompt, text_rephrase.target, text_rephrase.image) == (
        "Which colour does object 1 have?" + request_suffix, "red1", req.image)
    image_rephrase = second.generality["image_rephrase"][0]
    assert (image_rephrase.prompt, image_rephrase.target, image_rephrase.image) == (
        "What colour is object 1?" + request_suffix, "red1", os.path.join(root, "imgs/rephrase_1.png"))
    text_loc = second.locality["text_loc"][0]
    assert (text_loc.prompt, text_loc.target, text_loc.image) == (
        "who wrote book 1" + text_loc_suffix, "author 1", None)
    image_loc = second.locality["image_loc"][0]
    assert (image_loc.prompt, image_loc.target, image_loc.image) == (
        "How many cats in picture 1?" + image_loc_suffix, "2", os.path.join(root, "imgs/loc_1.png"))
    if port:
        assert [(s.prompt, s.target, s.image) for s in second.portability] == [("pq1", "pa1", req.image)]
    else:
        assert second.portability == []


def test_evqa_exact_prompts(tmp_path):
    path = write_records(tmp_path, [make_record(3)])
    record = load_edit_dataset("EVQA", path, "r", check_images=False)[0]
    assert record.requests[0].prompt == "What colour is object 3? The answer is:"
    assert record.locality["text_loc"][0].prompt == "who wrote book 3?"


def test_onehop_several_port_items_and_plain_vlkeb_ignores_them(tmp_path):
    items = [{"port_q": "q-a", "port_a": "a-a"}, {"port_q": "q-b", "port_a": "a-b", "extra": 1}]
    path = write_records(tmp_path, [make_record(0, port_new=items)])
    onehop = load_edit_dataset("vlkeb-onehop", path, "r", check_images=False)[0]
    assert [(s.prompt, s.target) for s in onehop.portability] == [("q-a", "a-a"), ("q-b", "a-b")]
    assert load_edit_dataset("VLKEB", path, "r", check_images=False)[0].portability == []


@pytest.mark.parametrize("pred", ["missing", None])
def test_pred_is_optional(tmp_path, pred):
    record = make_record(0)
    if pred == "missing":
        del record["pred"]
    else:
        record["pred"] = pred
    path = write_records(tmp_path, [record])
    assert load_edit_dataset("EVQA", path, "r", check_images=False)[0].original_answer is None


@pytest.mark.parametrize("spelling", ["evqa", "Eic", " VLKEB ", "vlkeb_onehop", "VLKEB-OneHop"])
def test_name_is_case_insensitive(tmp_path, spelling):
    path = write_records(tmp_path, [make_record(0, port=True)])
    assert len(load_edit_dataset(spelling, path, "r", check_images=False)) == 1


@pytest.mark.parametrize("bad_name", ["OKVQA", "", None])
def test_unknown_name_lists_valid_names(tmp_path, bad_name):
    path = write_records(tmp_path, [make_record(0)])
    message = load_error(bad_name, path, "r", check_images=False)
    for valid in ALL_DATASET_NAMES:
        assert valid in message


def test_limit_keeps_first_records_and_validates_only_those(tmp_path):
    records = [make_record(i) for i in range(5)]
    records[3]["alt"] = ""  # broken, but after the limit
    path = write_records(tmp_path, records)
    loaded = load_edit_dataset("EIC", path, "r", limit=3, check_images=False)
    assert [r.requests[0].target for r in loaded] == ["red0", "red1", "red2"]
    assert [r.index for r in loaded] == [0, 1, 2]
    assert len(load_edit_dataset("EIC", path, "r", limit=3, check_images=False)) == 3
    assert "record 3" in load_error("EIC", path, "r", limit=4, check_images=False)
    assert "record 3" in load_error("EIC", path, "r", check_images=False)
    ok = write_records(tmp_path, [make_record(i) for i in range(2)], "ok.json")
    assert len(load_edit_dataset("EIC", ok, "r", limit=100, check_images=False)) == 2


@pytest.mark.parametrize("limit", [0, -1, 2.5, "3", True])
def test_bad_limit(tmp_path, limit):
    path = write_records(tmp_path, [make_record(0)])
    assert "limit" in load_error("EVQA", path, "r", limit=limit, check_images=False)


# ---------------------------------------------------------------------------------------------
# Synthetic files: bad input
# ---------------------------------------------------------------------------------------------

def test_missing_json_file(tmp_path):
    path = str(tmp_path / "nope" / "vqa_eval.json")
    message = load_error("EVQA", path, "r", check_images=False)
    assert path in message and "not found" in message


def test_json_path_is_a_folder(tmp_path):
    message = load_error("EVQA", tmp_path, "r", check_images=False)
    assert str(tmp_path) in message and "not a file" in message


def test_malformed_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"src": "a",\n   "alt" "b"}\n]\n', encoding="utf-8")
    message = load_error("EVQA", path, "r", check_images=False)
    assert "broken.json" in message
    assert "line 3" in message and "column 10" in message


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.json"
    path.write_bytes('[{"src": "caf\xe9"}]'.encode("latin-1"))
    assert "latin.json" in load_error("EVQA", path, "r", check_images=False)


@pytest.mark.parametrize("top", [{"records": []}, "text", 3, None])
def test_top_level_not_a_list(tmp_path, top):
    path = write_json(tmp_path / "top.json", top)
    message = load_error("EVQA", path, "r", check_images=False)
    assert "top.json" in message and "list" in message


def test_empty_list(tmp_path):
    path = write_json(tmp_path / "empty.json", [])
    assert "empty.json" in load_error("EVQA", path, "r", check_images=False)


@pytest.mark.parametrize("bad", ["just text", 7, None, [1, 2]])
def test_record_not_an_object(tmp_path, bad):
    path = write_records(tmp_path, [make_record(0), bad], "mixed.json")
    message = load_error("EVQA", path, "r", check_images=False)
    assert "mixed.json" in message and "record 1" in message and "object" in message


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_missing_field(tmp_path, field):
    records = [make_record(i) for i in range(3)]
    del records[2][field]
    path = write_records(tmp_path, records, "fields.json")
    message = load_error("VLKEB", path, "r", check_images=False)
    assert "fields.json" in message and "record 2" in message and f"'{field}'" in message
    assert "missing" in message


@pytest.mark.parametrize("field,value", [("alt", 5), ("src", None), ("image", ["a.jpg"]),
                                         ("loc_ans", {"a": 1}), ("m_loc_q", True), ("pred", 3)])
def test_non_string_field(tmp_path, field, value):
    records = [make_record(0), make_record(1, **{field: value})]
    path = write_records(tmp_path, records, "types.json")
    message = load_error("EVQA", path, "r", check_images=False)
    assert "types.json" in message and "record 1" in message and f"'{field}'" in message
    assert "string" in message


@pytest.mark.parametrize("field", ["alt", "loc_ans", "m_loc_a", "src", "rephrase", "loc", "m_loc_q",
                                   "image", "image_rephrase", "m_loc"])
@pytest.mark.parametrize("value", ["", "  \t"])
def test_empty_target_prompt_or_image(tmp_path, field, value):
    records = [make_record(i) for i in range(4)]
    records[3][field] = value
    path = write_records(tmp_path, records, "empty_field.json")
    message = load_error("EIC", path, "r", check_images=False)
    assert "empty_field.json" in message and "record 3" in message and f"'{field}'" in message
    assert "empty" in message


@pytest.mark.parametrize("port_new,field", [
    ("MISSING", "'port_new'"),
    (None, "'port_new'"),
    ({"port_q": "q", "port_a": "a"}, "'port_new'"),
    ([], "'port_new'"),
    (["q"], "'port_new[0]'"),
    ([{"port_q": "q"}], "'port_new[0].port_a'"),
    ([{"port_q": "q", "port_a": "a"}, {"port_q": "", "port_a": "a"}], "'port_new[1].port_q'"),
    ([{"port_q": "q", "port_a": "   "}], "'port_new[0].port_a'"),
    ([{"port_q": "q", "port_a": 4}], "'port_new[0].port_a'"),
])
def test_bad_portability(tmp_path, port_new, field):
    record = make_record(1)
    if port_new != "MISSING":
        record["port_new"] = port_new
    path = write_records(tmp_path, [make_record(0, port=True), record], "onehop.json")
    message = load_error(VLKEB_ONEHOP, path, "r", check_images=False)
    assert "onehop.json" in message and "record 1" in message and field in message
    assert len(load_edit_dataset("VLKEB", path, "r", check_images=False)) == 2  # plain VLKEB ignores it


def test_all_problems_in_one_error(tmp_path):
    records = [make_record(i, alt="") for i in range(30)]
    path = write_records(tmp_path, records, "many.json")
    message = load_error("EVQA", path, "r", check_images=False)
    assert "30 problem(s)" in message
    assert "record 0," in message and "record 9," in message and "record 10," not in message
    assert "and 20 more" in message


# ---------------------------------------------------------------------------------------------
# Synthetic files: image existence checks and laziness
# ---------------------------------------------------------------------------------------------

def _make_images(root, records) -> None:
    for record in records:
        for field in ("image", "image_rephrase", "m_loc"):
            target = root / record[field]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (4, 4), (10, 20, 30)).save(target)


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened while parsing a dataset")
    monkeypatch.setattr(Image, "open", refuse)


def test_check_images_passes_when_all_present_without_decoding(tmp_path, monkeypatch):
    records = [make_record(i) for i in range(3)]
    records[2]["m_loc"] = records[0]["m_loc"]  # shared image, counted once
    root = tmp_path / "images"
    _make_images(root, records)
    path = write_records(tmp_path, records)

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened while parsing a dataset")
    monkeypatch.setattr(Image, "open", refuse)
    loaded = load_edit_dataset("EVQA", path, root, check_images=True)
    assert len(loaded) == 3

    monkeypatch.undo()
    os.remove(root / records[1]["image_rephrase"])
    message = load_error("EVQA", path, root, check_images=True)
    assert "1 of 8 images" in message
    assert os.path.join(str(root), records[1]["image_rephrase"]) in message


def test_missing_image_root_is_named(tmp_path):
    path = write_records(tmp_path, [make_record(0)])
    root = str(tmp_path / "no_such_folder")
    message = load_error("VLKEB", path, root, check_images=True)
    assert "3 of 3 images" in message and "does not exist" in message and "mmkb_images" in message


def test_check_images_false_touches_only_the_json(tmp_path, monkeypatch, no_pixel_decoding):
    path = write_records(tmp_path, [make_record(i) for i in range(3)])
    seen = []
    for probe in ("isfile", "exists", "isdir", "lexists"):
        real = getattr(os.path, probe)

        def spy(p, _real=real):
            seen.append(os.fspath(p))
            return _real(p)
        monkeypatch.setattr(os.path, probe, spy)
    loaded = load_edit_dataset("EVQA", path, tmp_path / "absent", check_images=False)
    monkeypatch.undo()
    assert len(loaded) == 3
    assert set(seen) <= {path}


# ---------------------------------------------------------------------------------------------
# default_data_paths
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,split,json_rel,image_rel", [
    ("EVQA", "train", "easy-edit-mm/vqa/vqa_train.json", "easy-edit-mm/images"),
    ("evqa", "eval", "easy-edit-mm/vqa/vqa_eval.json", "easy-edit-mm/images"),
    ("EIC", "train", "easy-edit-mm/caption/caption_train_edit.json", "easy-edit-mm/images"),
    ("EIC", "eval", "easy-edit-mm/caption/caption_eval_edit.json", "easy-edit-mm/images"),
    ("VLKEB", "train", "VLKEB/train.json", "VLKEB/mmkb_images"),
    ("VLKEB", "eval", "VLKEB/eval.json", "VLKEB/mmkb_images"),
    ("VLKEB-ONEHOP", "eval", "VLKEB/eval_edit_onehop.json", "VLKEB/mmkb_images"),
])
def test_default_data_paths(name, split, json_rel, image_rel):
    json_path, image_root = default_data_paths(name, split, data_dir="mydata")
    assert json_path == os.path.join("mydata", *json_rel.split("/"))
    assert image_root == os.path.join("mydata", *image_rel.split("/"))
    assert default_data_paths(name, split)[0] == os.path.join("data", *json_rel.split("/"))


def test_default_data_paths_errors():
    with pytest.raises(UserError, match="eval"):
        default_data_paths("VLKEB-ONEHOP", "train")
    with pytest.raises(UserError, match="train, eval"):
        default_data_paths("EVQA", "test")
    with pytest.raises(UserError, match="EVQA"):
        default_data_paths("COCO", "train")
    assert set(DATASET_NAMES) == {"EVQA", "EIC", "VLKEB"}


# ---------------------------------------------------------------------------------------------
# Images: conversion to RGB
# ---------------------------------------------------------------------------------------------

def test_rgb_stays_rgb(tmp_path):
    path = save_image(tmp_path / "rgb.png", Image.new("RGB", (2, 1), (1, 2, 3)))
    assert rgb_pixels(load_image(path)) == [(1, 2, 3), (1, 2, 3)]


def test_grey_L_and_1bit(tmp_path):
    grey = Image.new("L", (2, 1))
    grey.putdata([0, 200])
    assert rgb_pixels(load_image(save_image(tmp_path / "l.png", grey))) == [(0, 0, 0), (200, 200, 200)]
    bits = Image.new("1", (2, 1))
    bits.putdata([0, 255])
    assert rgb_pixels(load_image(save_image(tmp_path / "b.png", bits))) == [(0, 0, 0), (255, 255, 255)]


def test_rgba_composited_on_white(tmp_path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    pixels = rgb_pixels(load_image(save_image(tmp_path / "rgba.png", image)))
    assert pixels[0] == (255, 255, 255)
    assert pixels[1] == (0, 0, 255)
    assert all(abs(c - 127) <= 1 for c in pixels[2])


def test_la_composited_on_white(tmp_path):
    image = Image.new("LA", (2, 1))
    image.putdata([(0, 0), (50, 255)])
    assert rgb_pixels(load_image(save_image(tmp_path / "la.png", image))) == [(255, 255, 255), (50, 50, 50)]


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putdata([0, 1])
    assert rgb_pixels(load_image(save_image(tmp_path / "p.png", image))) == [(0, 0, 0), (10, 200, 30)]
    transparent = save_image(tmp_path / "pt.png", image, transparency=0)
    assert rgb_pixels(load_image(transparent)) == [(255, 255, 255), (10, 200, 30)]
    gif = save_image(tmp_path / "pt.gif", image, transparency=0)
    assert rgb_pixels(load_image(gif)) == [(255, 255, 255), (10, 200, 30)]


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (2, 1))
    image.putdata([(0, 0, 0, 0), (255, 0, 0, 0)])
    path = save_image(tmp_path / "cmyk.tif", image)
    assert Image.open(path).mode == "CMYK"
    assert rgb_pixels(load_image(path)) == [(255, 255, 255), (0, 255, 255)]
    jpeg = save_image(tmp_path / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 0, 0, 0)), quality=95)
    assert all(min(px) >= 250 for px in rgb_pixels(load_image(jpeg)))


def test_16bit_png_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257 * 128, 65535, 1000, 257 * 200]], dtype=np.uint16)
    path = save_image(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    expected = [(0, 0, 0), (128, 128, 128), (255, 255, 255), (4, 4, 4), (200, 200, 200)]
    assert rgb_pixels(load_image(path)) == expected


def test_float_tiff(tmp_path):
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = save_image(tmp_path / "float.tif", Image.fromarray(values))
    assert Image.open(path).mode == "F"
    assert rgb_pixels(load_image(path)) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_loaded_image_does_not_keep_the_file_open(tmp_path):
    path = save_image(tmp_path / "x.jpg", Image.new("RGB", (8, 8), (200, 0, 0)))
    image = load_image(path)
    os.remove(path)
    assert image.size == (8, 8) and image.getpixel((4, 4))[0] > 190


# ---------------------------------------------------------------------------------------------
# Images: errors
# ---------------------------------------------------------------------------------------------

def test_missing_image(tmp_path):
    path = str(tmp_path / "gone.jpg")
    with pytest.raises(UserError, match="gone.jpg"):
        load_image(path)


def test_image_path_is_a_folder(tmp_path):
    with pytest.raises(UserError) as info:
        load_image(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_corrupt_image_random_bytes(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UserError) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_image(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.png"
    Image.fromarray(noise).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(UserError) as info:
        load_image(cut)
    assert str(cut) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Images: cache
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def decode_counter(monkeypatch):
    """Count calls of utils.images.load_image made by the cache (optionally slowed down)."""
    calls = []
    real = images_module.load_image
    state = {"delay": 0.0}

    def counting(path):
        calls.append(os.fspath(path))
        time.sleep(state["delay"])
        return real(path)
    monkeypatch.setattr(images_module, "load_image", counting)
    return calls, state


def test_cache_decodes_once(tmp_path, decode_counter):
    calls, _ = decode_counter
    path = save_image(tmp_path / "a.png", Image.new("L", (3, 3), 9))
    cache = ImageCache()
    first = cache.get(path)
    assert first.mode == "RGB"
    for _ in range(5):
        assert cache.get(path) is first
    assert cache.get(str(tmp_path / "." / "a.png")) is first  # same file, other spelling
    assert len(calls) == 1
    assert (cache.hits, cache.misses) == (6, 1)
    assert path in cache and len(cache) == 1


def test_cache_evicts_least_recently_used(tmp_path, decode_counter):
    calls, _ = decode_counter
    paths = [save_image(tmp_path / f"{i}.png", Image.new("RGB", (2, 2), (i, i, i))) for i in range(3)]
    cache = ImageCache(max_items=2)
    a = cache.get(paths[0])
    cache.get(paths[1])
    assert cache.get(paths[0]) is a  # refresh a: b is now the oldest
    cache.get(paths[2])  # evicts b
    assert len(cache) == 2 and paths[1] not in cache and paths[0] in cache
    assert cache.get(paths[0]) is a
    cache.get(paths[1])
    assert calls == [paths[0], paths[1], paths[2], paths[1]]
    cache.clear()
    assert len(cache) == 0


def test_cache_concurrent_gets_decode_once(tmp_path, decode_counter):
    calls, state = decode_counter
    state["delay"] = 0.05
    path = save_image(tmp_path / "shared.png", Image.new("RGB", (16, 16), (5, 6, 7)))
    cache = ImageCache(max_items=4)
    barrier = threading.Barrier(12)
    results = [None] * 12

    def worker(slot):
        barrier.wait()
        results[slot] = cache.get(path)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert all(result is results[0] for result in results)


def test_cache_does_not_keep_failures(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"not an image at all")
    cache = ImageCache()
    for _ in range(2):
        with pytest.raises(UserError, match="bad.png"):
            cache.get(path)
    assert len(cache) == 0
    Image.new("RGB", (2, 2)).save(path, format="PNG")
    assert cache.get(path).size == (2, 2)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True])
def test_cache_rejects_bad_size(bad):
    with pytest.raises(ValueError):
        ImageCache(max_items=bad)
