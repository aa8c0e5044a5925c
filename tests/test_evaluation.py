"""Sequential evaluation, batched scoring, FT-L / FT-M and the `test_vllm_edit.py` CLI (spec §9, §11.7-8)."""
from __future__ import annotations

import glob
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

import editors
from conftest import TINY, tiny_vllm
from editors import load_editor
from editors.base import Editor
from utils.errors import UserError
from utils.io import none_or_value
from runs.evaluation import EvalConfig, evaluate, lifelong_checkpoints, split_into_chunks
from utils.records import Sample
from utils.scoring import generate_answers, teacher_forced, token_accuracy

ITEM_KEYS = ["image", "prompt", "target", "predict_after_edit", "acc", "exact_match"]
REL_KEYS = ["image", "prompt", "target", "edit_time", "predict_after_edit", "acc", "exact_match"]
LOC_KEYS = ["image", "prompt", "target", "predict_before_edit", "predict_after_edit", "acc", "exact_match"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from toyworld.world import generate_toyworld

    out = tmp_path_factory.mktemp("eval") / "toyworld"
    generate_toyworld(out, n_train=2, n_eval=8, n_pretrain_scenes=2)
    return str(out)


@pytest.fixture(scope="module")
def records(world):
    from utils.data import load_edit_dataset

    return load_edit_dataset("TOY", os.path.join(world, "eval.json"), world)


@pytest.fixture(scope="module")
def llava():
    return tiny_vllm("tiny-llava")


# ---- test-only editors ------------------------------------------------------------------------

class CountingEditor(Editor):
    """Changes nothing; counts edit calls, raises on call number `fail_on`, may save / load its edits."""

    name = "noop"
    supports_batch_edit = False

    def __init__(self, vllm, fail_on: int | None = None, can_save: bool = False):
        super().__init__(vllm, None)
        self.calls, self.loads, self._n = 0, 0, 0
        self.fail_on, self.can_save = fail_on, can_save
        self.saves_edits = can_save

    @property
    def num_edits(self) -> int:
        return self._n

    def edit(self, requests):
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        self._n += len(requests)

    def restore(self):
        self._n = 0

    def save_edits(self, directory):
        if not self.can_save:
            return super().save_edits(directory)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "n.json"), "w") as f:
            json.dump(self._n, f)

    def load_edits(self, directory):
        with open(os.path.join(directory, "n.json")) as f:
            self._n = json.load(f)
        self.loads += 1


class BiasEditor(Editor):
    """Pushes the first target token of every active edit to the top of the logits (detectable)."""

    name = "bias"

    def __init__(self, vllm):
        super().__init__(vllm, None)
        self.tokens: list[int] = []
        self.handle = None

    @property
    def num_edits(self) -> int:
        return len(self.tokens)

    def edit(self, requests):
        for r in requests:
            self.tokens.append(self.vllm.tokenizer(" " + r.target, add_special_tokens=False)["input_ids"][0])
        if self.handle is None:
            self.handle = self.vllm.stack.lm_head.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        bias = torch.zeros(output.shape[-1], dtype=output.dtype, device=output.device)  # [V]
        bias[self.tokens] = 1e4
        return output + bias  # [b, l, V]

    def restore(self):
        self.tokens = []
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def config(tmp_path, sen: int, **kwargs) -> EvalConfig:
    return EvalConfig(sequential_edit_n=sen, results_dir=str(tmp_path / "results"), show_progress=False, **kwargs)


def read(folder, name):
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def floats(obj) -> list[float]:
    if isinstance(obj, float):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [x for v in obj for x in floats(v)] if isinstance(obj, list) else []


def drop_times(obj):
    """A copy without timing fields (they differ between runs)."""
    if isinstance(obj, dict):
        return {k: drop_times(v) for k, v in obj.items() if k not in ("edit_time", "run")}
    if isinstance(obj, list):
        return [drop_times(v) for v in obj]
    return obj


# ---- the protocol -----------------------------------------------------------------------------

def test_sen_equal_to_data_size_gives_one_chunk(llava, records, tmp_path):
    out = evaluate(CountingEditor(llava), records, config(tmp_path, len(records)))
    results = read(out.folder, "results.json")
    assert len(results) == 1 and len(results[0]) == len(records)
    assert [s["sequential_edit_n"] for s in out.split_mean] == [len(records)]
    assert out.total_mean["total_edit_n"] == len(records)


def test_partial_trailing_chunk_is_dropped_as_the_authors_do_unless_kept(llava, records, tmp_path):
    five = records[:5]
    assert [len(c) for c in split_into_chunks(five, 2)] == [2, 2]
    assert [len(c) for c in split_into_chunks(five, 2, keep_partial=True)] == [2, 2, 1]
    out = evaluate(CountingEditor(llava), five, config(tmp_path, 2))
    assert [len(c) for c in read(out.folder, "results.json")] == [2, 2]
    assert out.total_mean["total_edit_n"] == 4 and out.run["records_not_scored"] == 1
    kept = evaluate(CountingEditor(llava), five, config(tmp_path, 2, keep_partial_chunk=True, eval_name_postfix="kept"))
    assert [s["sequential_edit_n"] for s in read(kept.folder, "mean_results.json")["split_mean"]] == [2, 2, 1]
    assert kept.total_mean["total_edit_n"] == 5 and kept.run["records_not_scored"] == 0
    run = read(kept.folder, "mean_results.json")["run"]
    assert run["identity"]["protocol"]["keep_partial_chunk"] is True


def test_sen_100_over_250_records_scores_200_edits(llava, records):
    many = [records[i % len(records)] for i in range(250)]
    assert sum(len(c) for c in split_into_chunks(many, 100)) == 200
    with pytest.raises(UserError, match="--keep_partial_chunk"):
        split_into_chunks(many[:50], 100)


def test_sen_1_scores_each_record_right_after_its_own_edit(llava, records, tmp_path):
    assert len({r.requests[0].target for r in records}) > 1
    one = evaluate(BiasEditor(llava), records, config(tmp_path, 1, exact_match=False))
    rel = [r["reliability"][0]["acc"] for chunk in read(one.folder, "results.json") for r in chunk]
    assert rel == [1.0] * len(records)  # only its own edit was active when it was scored
    assert len(one.split_mean) == len(records)
    everything = evaluate(BiasEditor(llava), records, config(tmp_path, len(records), exact_match=False))
    assert everything.total_mean["reliability"]["acc"] < 1.0  # all edits at once compete


@torch.no_grad()
def unedited_accuracy(vllm, samples: list[Sample]) -> float:
    """Teacher-forced token accuracy, one sample at a time, without utils.scoring."""
    accs = []
    for s in samples:
        batch = vllm.prepare([s.prompt], [s.image], [s.target])
        pred = vllm(batch).argmax(-1)[batch.label_mask]  # [n]
        accs.append((pred == batch.labels[batch.label_mask]).float().mean().item())
    return float(np.mean(accs))


def test_noop_editor_keeps_locality_and_unedited_reliability(llava, records, tmp_path):
    out = evaluate(CountingEditor(llava), records, config(tmp_path, 3))
    loc = out.total_mean["locality"]
    assert loc["text_loc"] == {"acc": 1.0, "exact_match": 1.0}
    assert loc["image_loc"] == {"acc": 1.0, "exact_match": 1.0}
    expected = unedited_accuracy(llava, [r.requests[0] for r in records])
    assert out.total_mean["reliability"]["acc"] == pytest.approx(expected, abs=1e-12)


def test_batched_scoring_equals_batch_1(llava, records, tmp_path):
    ft = load_editor("ft_l", llava)
    one = evaluate(ft, records[:6], config(tmp_path / "b1", 3, batch_size=1))
    many = evaluate(ft, records[:6], config(tmp_path / "b16", 3, batch_size=16))
    assert drop_times(read(one.folder, "results.json")) == drop_times(read(many.folder, "results.json"))
    assert drop_times(read(one.folder, "mean_results.json")) == drop_times(read(many.folder, "mean_results.json"))


def test_scoring_functions_are_batch_invariant(llava, records):
    samples = [s for r in records for s in r.requests + r.locality["text_loc"] + r.locality["image_loc"]]
    a, b = teacher_forced(llava, samples, 1), teacher_forced(llava, samples, 7)
    assert a == b
    n = [len(x) for x in a.labels]
    assert generate_answers(llava, samples, n, 1) == generate_answers(llava, samples, n, 5)
    assert token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75


def test_json_layout_matches_spec(llava, records, tmp_path):
    port = [Sample("what is the shape? The answer is:", "circle", records[0].requests[0].image)]
    recs = [records[0].__class__(**{**records[0].__dict__, "portability": port})] + list(records[1:3])
    out = evaluate(CountingEditor(llava), recs, config(tmp_path, 2, keep_partial_chunk=True))
    results, means = read(out.folder, "results.json"), read(out.folder, "mean_results.json")
    first = results[0][0]
    assert list(first) == ["generality", "locality", "portability", "reliability"]
    assert list(results[0][1]) == ["generality", "locality", "reliability"]
    assert list(first["generality"]) == ["text_rephrase", "image_rephrase"]
    assert list(first["locality"]) == ["text_loc", "image_loc"]
    assert list(first["reliability"][0]) == REL_KEYS
    assert list(first["generality"]["image_rephrase"][0]) == ITEM_KEYS
    assert list(first["portability"][0]) == ITEM_KEYS
    assert list(first["locality"]["text_loc"][0]) == LOC_KEYS and first["locality"]["text_loc"][0]["image"] is None
    assert list(means) == ["total_mean", "split_mean", "run"]
    total = means["total_mean"]
    assert list(total) == ["generality", "locality", "portability", "reliability", "total_edit_n"]
    assert list(total["reliability"]) == ["edit_time", "acc", "exact_match"]
    assert list(total["generality"]["text_rephrase"]) == ["acc", "exact_match"]
    assert [list(s)[-1] for s in means["split_mean"]] == ["sequential_edit_n"] * 2
    for key in ("config", "total_edit_time_s", "edits_per_s", "records_per_s", "device"):
        assert key in means["run"]
    run = means["run"]  # what the tables read: time per edit and peak memory
    assert abs(run["edit_time_per_edit_s"] - run["total_edit_time_s"] / run["total_edit_n"]) <= 2e-4
    assert run["peak_kind"] == "process_rss" and run["peak_mb"] > 50  # torch alone takes more
    assert all(round(x, 4) == x for x in floats(results) + floats(means))
    plain = evaluate(CountingEditor(llava), recs, config(tmp_path, 2, exact_match=False, eval_name_postfix="x"))
    assert "exact_match" not in json.dumps(read(plain.folder, "results.json"))
    assert plain.folder.endswith(os.path.join("TOY-x", "sequential_edit_2"))


def test_batch_edit_editor_gets_one_call_per_chunk(llava, records, tmp_path):
    editor = CountingEditor(llava)
    editor.supports_batch_edit = True
    out = evaluate(editor, records[:5], config(tmp_path, 2, exact_match=False, keep_partial_chunk=True))
    assert editor.calls == 3
    times = [{r["reliability"][0]["edit_time"] for r in chunk} for chunk in read(out.folder, "results.json")]
    assert [len(t) for t in times] == [1, 1, 1]  # a batched call's time is split evenly


def test_interrupted_run_resumes_after_last_finished_chunk(llava, records, tmp_path):
    six = records[:6]
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(CountingEditor(llava, fail_on=5), six, config(tmp_path, 2))  # dies in chunk 3
    again = CountingEditor(llava)
    out = evaluate(again, six, config(tmp_path, 2))
    assert again.calls == 2 and out.chunks_resumed == 2 and out.chunks_run == 1
    assert len(read(out.folder, "results.json")) == 3
    done = CountingEditor(llava)
    assert evaluate(done, six, config(tmp_path, 2)).already_complete and done.calls == 0
    with pytest.raises(UserError, match="--overwrite"):
        evaluate(CountingEditor(llava), six, config(tmp_path, 2, exact_match=False))
    fresh = CountingEditor(llava)
    evaluate(fresh, six, config(tmp_path, 2, exact_match=False, overwrite=True))
    assert fresh.calls == 6


def test_results_made_with_other_weights_of_the_same_backbone_are_not_reused(llava, records, tmp_path):
    from editors.vllms import load_vllm, save_vllm

    folders = [tmp_path / "weights_a", tmp_path / "weights_b"]
    for folder in folders:
        save_vllm(llava, str(folder))
    first, second = (load_vllm("tiny-llava", path=str(folder)) for folder in folders)
    assert first.source == os.path.realpath(folders[0]) and llava.source is None
    evaluate(CountingEditor(first), records[:2], config(tmp_path, 2, exact_match=False))
    with pytest.raises(UserError, match="backbone_source"):
        evaluate(CountingEditor(second), records[:2], config(tmp_path, 2, exact_match=False))


@pytest.mark.parametrize("can_save", [True, False])
def test_lifelong_resume_reloads_or_replays_edits(llava, records, tmp_path, can_save):
    five = records[:5]
    assert lifelong_checkpoints(5) == [1, 5] and lifelong_checkpoints(100) == [1, 10, 100]
    with pytest.raises(RuntimeError):
        evaluate(CountingEditor(llava, fail_on=4, can_save=can_save), five, config(tmp_path, 2, lifelong=True))
    again = CountingEditor(llava, can_save=can_save)
    out = evaluate(again, five, config(tmp_path, 2, lifelong=True))
    assert again.loads == (1 if can_save else 0)
    assert again.calls == (3 if can_save else 5)  # 2 finished chunks = 2 edits reloaded, or replayed
    lifelong = read(out.folder, "lifelong.json")["checkpoints"]
    assert [c["edits"] for c in lifelong] == [1, 5] and [c["scored_records"] for c in lifelong] == [1, 5]
    assert lifelong[1]["mean"]["locality"]["image_loc"]["acc"] == 1.0
    assert out.folder.endswith("lifelong_edit_2") and os.path.isfile(os.path.join(out.folder, "metrics_vs_edits.png"))


# ---- FT-L / FT-M ------------------------------------------------------------------------------

def target_state(vllm, sample: Sample):
    with torch.no_grad():
        batch = vllm.prepare([sample.prompt], [sample.image], [sample.target])
        logits = vllm(batch)  # [1, l, V]
        picked = logits[batch.label_mask]  # [n, V]
        nll = torch.nn.functional.cross_entropy(picked, batch.labels[batch.label_mask]).item()
        acc = (picked.argmax(-1) == batch.labels[batch.label_mask]).float().mean().item()
    return logits, nll, acc


@pytest.mark.parametrize("name", TINY)
def test_ft_l_edits_and_restores_bit_identically(name, records, tmp_path):
    vllm = tiny_vllm(name)
    editor = load_editor("ft_l", vllm)
    editor.config.lr = 1e-2  # a random tiny LM head is weak: a larger step makes the edit decisive
    request = records[0].requests[0]
    before, nll0, acc0 = target_state(vllm, request)
    try:
        editor.edit([request])
        edited, nll1, acc1 = target_state(vllm, request)
        assert acc1 == 1.0 and acc0 < 1.0 and nll1 < nll0 and editor.num_edits == 1
        editor.save_edits(str(tmp_path / "edits"))
        editor.restore()
        assert torch.equal(target_state(vllm, request)[0], before) and editor.num_edits == 0
        editor.load_edits(str(tmp_path / "edits"))
        assert torch.equal(target_state(vllm, request)[0], edited) and editor.num_edits == 1
    finally:
        editor.restore()
    assert torch.equal(target_state(vllm, request)[0], before)


def test_ft_l_batch_edit_tunes_all_requests_at_once(llava, records):
    editor = load_editor("ft_l", llava)
    editor.config.batch_edit = True
    requests = [records[0].requests[0], records[1].requests[0]]
    nll_before = [target_state(llava, r)[1] for r in requests]
    try:
        assert editor.supports_batch_edit
        editor.edit(requests)
        assert editor.num_edits == 2
        assert all(target_state(llava, r)[1] < b for r, b in zip(requests, nll_before))
    finally:
        editor.restore()


@pytest.mark.parametrize("name", TINY)
def test_ft_m_edits_the_bridge_only(name, records):
    vllm = tiny_vllm(name)
    editor = load_editor("ft_m", vllm)
    request, text = records[0].requests[0], records[0].locality["text_loc"][0]
    before, nll0, _ = target_state(vllm, request)
    text_before = target_state(vllm, text)[0]
    try:
        editor.edit([request])
        edited, nll1, _ = target_state(vllm, request)
        assert nll1 < nll0 and not torch.equal(edited, before)
        assert torch.equal(target_state(vllm, text)[0], text_before)  # text-only inputs never change
    finally:
        editor.restore()
    assert torch.equal(target_state(vllm, request)[0], before)


def test_ft_l_changes_reliability_in_evaluation(llava, records, tmp_path):
    base = evaluate(CountingEditor(llava), records[:4], config(tmp_path / "noop", 1, exact_match=False))
    ft = evaluate(load_editor("ft_l", llava), records[:4], config(tmp_path / "ft", 1, exact_match=False))
    assert ft.total_mean["reliability"]["acc"] > base.total_mean["reliability"]["acc"]


# ---- CLI --------------------------------------------------------------------------------------

def cli():
    import test_vllm_edit

    return test_vllm_edit


def test_cli_refuses_untrained_editor(tmp_path, monkeypatch, capsys):
    class StubTrainable(Editor):
        name = "liveedit"
        needs_training = True

    module = types.ModuleType("stub_trainable_editor")
    module.StubTrainable = StubTrainable
    monkeypatch.setitem(sys.modules, "stub_trainable_editor", module)
    monkeypatch.setitem(editors.EDITORS, "liveedit", "stub_trainable_editor:StubTrainable")
    data_dir = tmp_path / "data"
    rc = cli().main(["-en", "liveedit", "-mn", "tiny-llava", "-sen", "1", "-dn", "toy", "-ckpt", "None",
                     "--data_dir", str(data_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "-ckpt" in err and "--allow_untrained" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not data_dir.exists()  # refused before any data or model was touched
    assert none_or_value("none") is None and none_or_value("a/b") == "a/b"


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    rc = cli().main(["-en", "ft_l", "-mn", "tiny-llava", "-sen", "1", "-dn", "nosuchdata"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err


def test_cli_end_to_end_on_toy_with_ft_l(tmp_path, monkeypatch, capsys):
    from toyworld.world import generate_toyworld

    module = cli()
    generate_toyworld(str(tmp_path / "data" / "toyworld"), n_train=2, n_eval=5, n_pretrain_scenes=2)  # kept as is
    rc = module.main(["-en", "FT_L", "-mn", "tiny-llava", "-sen", "3", "-dn", "toy", "--data_dir",
                      str(tmp_path / "data"), "--results_dir", str(tmp_path / "res"), "--no_progress",
                      "--eval_batch_size", "8", "--keep_partial_chunk"])
    out = capsys.readouterr().out
    assert rc == 0, out
    folder = os.path.join(str(tmp_path / "res"), "ft_l", "tiny-llava", "TOY", "sequential_edit_3")
    for name in ("results.json", "mean_results.json", "metrics_vs_edits.png"):
        assert os.path.isfile(os.path.join(folder, name)), name
    assert glob.glob(os.path.join(folder, "tb", "events.out.tfevents.*"))
    means = read(folder, "mean_results.json")
    assert [s["sequential_edit_n"] for s in means["split_mean"]] == [3, 2]
    assert "Rel" in out and f"results: {folder}" in out


def test_results_made_with_other_auxiliary_models_are_not_reused(llava, records, tmp_path):
    """A retriever trained or random (`--aux_model_path`) gives other numbers: a rerun must not reuse them."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    evaluate(CountingEditor(llava), records[:2], config(tmp_path, 1, aux_model_paths=[f"tiny-mpnet={tmp_path / 'a'}"]))
    with pytest.raises(UserError, match="aux_model_paths"):
        evaluate(CountingEditor(llava), records[:2], config(tmp_path, 1, aux_model_paths=[f"tiny-mpnet={tmp_path / 'b'}"]))
