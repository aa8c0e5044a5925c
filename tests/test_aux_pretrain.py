"""The trained tiny LTE retriever (runs/aux_pretrain.py): it learns question -> edit-key matching from
the toy world's train split, is cached, and LTE loads it with --aux_model_path tiny-mpnet=FOLDER."""
from __future__ import annotations

import os

import pytest
import torch

from editors.auxiliary import build_tiny_aux
from runs.aux_pretrain import (REPORT_FILE, RetrieverPretrainConfig, embed, ensure_retriever, lte_key,
                               mixed_question_chunks, retrieval_report, train_retriever, training_pairs)
from runs.data import load_split

CFG = RetrieverPretrainConfig(steps=80, warmup=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("retriever")
    generate_toyworld(root / "data" / "toyworld", n_train=60, n_eval=30, n_pretrain_scenes=2)
    folder = ensure_retriever(str(root / "data"), str(root / "records"), CFG)
    return root, folder


def test_training_pairs_come_from_the_given_split_with_lte_keys(world):
    root, _ = world
    _, train = load_split("TOY", "train", str(root / "data"))
    pairs = training_pairs(train)
    request = train[0].requests[0]
    key = f"{request.prompt} {request.target}"
    assert (request.prompt, key) in {(p.query, p.key) for p in pairs}
    assert (train[0].generality["text_rephrase"][0].prompt, key) in {(p.query, p.key) for p in pairs}
    train_keys = {lte_key(r.requests[0].prompt, r.requests[0].target) for r in train}
    assert {p.key for p in pairs if p.question} == train_keys
    fact = train[0].locality["text_loc"][0]
    assert (fact.prompt, lte_key(fact.prompt, fact.target), None) in {(p.query, p.key, p.question) for p in pairs}


def test_same_seed_same_weights(world):
    root, _ = world
    _, train = load_split("TOY", "train", str(root / "data"))
    cfg = RetrieverPretrainConfig(steps=3, warmup=1)
    a, b = (train_retriever(train, cfg)[0].model.state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train_retriever(train, RetrieverPretrainConfig(steps=3, warmup=1, seed=1))[0].model.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


@torch.no_grad()
def test_trained_retriever_ranks_its_own_key_first_and_leaves_locality_alone(world):
    """On held-out (eval) records, in chunks where the text can tell the edits apart: the trained
    stand-in ranks a query's (or its rephrase's) own key first, above 0.3, far more often than the
    random one, and locality questions stay below 0.3 where the random one retrieves them all."""
    root, folder = world
    from editors.auxiliary import load_aux_folder

    _, evals = load_split("TOY", "eval", str(root / "data"))
    chunks = mixed_question_chunks(evals)
    assert chunks and all(len(c) == 3 for c in chunks)
    trained = retrieval_report(load_aux_folder("tiny-mpnet", folder), chunks)
    random = retrieval_report(build_tiny_aux("tiny-mpnet", seed=0), chunks)
    own = lambda r: (r["rel"] + r["text_rephrase"]) / 2  # noqa: E731
    assert own(trained) >= 0.9 and own(trained) >= own(random) + 0.2, (trained, random)
    singles = [[r] for r in evals]
    trained1 = retrieval_report(load_aux_folder("tiny-mpnet", folder), singles)
    random1 = retrieval_report(build_tiny_aux("tiny-mpnet", seed=0), singles)
    assert trained1["text_loc"] <= 0.1 and trained1["image_loc"] <= 0.1, trained1
    assert random1["text_loc"] >= 0.9 and random1["image_loc"] >= 0.9, random1


def test_cached_folder_is_reused_and_lte_loads_it_through_the_flag(world):
    from conftest import tiny_vllm
    from editors.baselines.lte import LTE, LTEConfig
    from editors.vllms.paths import set_aux_flag_paths

    root, folder = world
    report = os.path.join(folder, REPORT_FILE)
    stamp = os.stat(report).st_mtime_ns
    assert ensure_retriever(str(root / "data"), str(root / "records"), CFG) == folder
    assert os.stat(report).st_mtime_ns == stamp  # not trained again
    _, evals = load_split("TOY", "eval", str(root / "data"))
    record = next(r for c in mixed_question_chunks(evals) for r in c)
    set_aux_flag_paths([f"tiny-mpnet={folder}"])
    try:
        editor = LTE(tiny_vllm("tiny-blip2"), LTEConfig(retriever_model="tiny-mpnet"))
    finally:
        set_aux_flag_paths([])
    try:
        from editors.auxiliary import load_aux_folder

        texts = [record.requests[0].prompt, record.locality["text_loc"][0].prompt]
        saved = load_aux_folder("tiny-mpnet", folder)
        with torch.no_grad():
            torch.testing.assert_close(editor.encode(texts), embed(saved, texts, "mean"))
        editor.edit(record.requests[:1])
        assert editor.retrieve([record.requests[0].prompt, record.generality["text_rephrase"][0].prompt,
                                record.locality["text_loc"][0].prompt, record.locality["image_loc"][0].prompt]) \
            == [0, 0, None, None]
    finally:
        editor.remove()


def test_cli_refuses_bad_steps_in_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "runs.aux_pretrain", "--data_dir", str(tmp_path), "--steps", "0"],
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --steps must be >= 1, got 0"
    assert not os.listdir(tmp_path)  # nothing generated or written
