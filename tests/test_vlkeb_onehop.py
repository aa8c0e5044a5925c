"""VLKEB one-hop portability as VLKEB evaluates it: after a record's edit, a second, text-only edit
port_edit_q -> port_edit_a, then port_q is scored against port_a (the `--portability_second_edit`
protocol, default on). Run on the real one-hop annotation file with stub images."""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from conftest import tiny_vllm
from editors.base import Editor
from runs.evaluation import EvalConfig, evaluate
from utils.data import load_edit_dataset

N_RECORDS = 4


class RecordingEditor(Editor):
    """Changes nothing; remembers every request it was asked to edit, in order."""

    name = "recorder"

    def __init__(self, vllm, text_only: bool = True):
        super().__init__(vllm, None)
        self.edits_text_only = text_only
        self.seen, self._n = [], 0

    @property
    def num_edits(self) -> int:
        return self._n

    def edit(self, requests):
        self.seen += list(requests)
        self._n += len(requests)

    def restore(self):
        self._n = 0


@pytest.fixture(scope="module")
def onehop(tmp_path_factory):
    """The first records of the real eval_edit_onehop.json, with an 8x8 PNG at every image path."""
    folder = os.environ.get("LIVEEDIT_REAL_DATA")
    if not folder or not os.path.isfile(os.path.join(folder, "VLKEB", "eval_edit_onehop.json")):
        pytest.skip("LIVEEDIT_REAL_DATA does not hold VLKEB/eval_edit_onehop.json")
    with open(os.path.join(folder, "VLKEB", "eval_edit_onehop.json")) as f:
        raw = json.load(f)[:N_RECORDS]
    root = tmp_path_factory.mktemp("vlkeb") / "mmkb_images"
    for record in raw:
        for field in ("image", "image_rephrase", "m_loc"):
            path = root / record[field]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40, 90, 160)).save(path)
    annotations = root.parent / "eval_edit_onehop.json"
    annotations.write_text(json.dumps(raw))
    return raw, load_edit_dataset("VLKEB-ONEHOP", str(annotations), str(root))


@pytest.fixture(scope="module")
def llava():
    torch.set_num_threads(1)
    return tiny_vllm("tiny-llava")


def run(editor, records, tmp_path, **kwargs):
    cfg = EvalConfig(sequential_edit_n=2, data_name="VLKEB-ONEHOP", results_dir=str(tmp_path), exact_match=False,
                     show_progress=False, **kwargs)
    return evaluate(editor, records, cfg)


def test_each_edit_is_followed_by_vlkebs_second_text_only_edit(onehop, llava, tmp_path):
    raw, records = onehop
    editor = RecordingEditor(llava)
    out = run(editor, records, tmp_path)
    assert all(len(record["port_new"]) == 1 for record in raw)
    mains, seconds = editor.seen[0::2], editor.seen[1::2]  # each record: its edit, then its second edit
    assert [s.target for s in mains] == [record["alt"] for record in raw]
    assert [(s.prompt, s.target) for s in seconds] == [(r["port_new"][0]["port_edit_q"], r["port_new"][0]["port_edit_a"])
                                                       for r in raw]
    assert all(s.image is None for s in seconds)  # text-only, as VLKEB makes it
    assert out.run["second_edits"] == N_RECORDS and out.total_mean["total_edit_n"] == N_RECORDS
    assert out.run["second_edit_image"] == "text-only"
    assert "portability" in out.total_mean  # port_q scored against port_a


def test_an_editor_that_needs_images_gets_the_second_edit_with_the_records_image(onehop, llava, tmp_path):
    _, records = onehop
    editor = RecordingEditor(llava, text_only=False)
    out = run(editor, records, tmp_path)
    seconds = editor.seen[1::2]
    assert [s.image for s in seconds] == [r.requests[0].image for r in records]
    assert "record's image" in out.run["second_edit_image"]


def test_the_one_edit_variant_makes_only_the_main_edits(onehop, llava, tmp_path):
    _, records = onehop
    editor = RecordingEditor(llava)
    out = run(editor, records, tmp_path, portability_second_edit=False)
    assert [s.target for s in editor.seen] == [r.requests[0].target for r in records]
    assert out.run["second_edits"] == 0 and out.run["second_edit_image"] is None
