"""The toy world generator: determinism, MMEdit schema, redraws, text facts, caching, and the
lifelong-editing guarantees (unique edits per split, a disjoint locality pool, tints)."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from toyworld import world as tw
from utils.errors import UserError

SMALL = dict(n_train=12, n_eval=10, image_size=32, seed=3, n_pretrain_scenes=6, n_facts=12)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("tw") / "world"
    manifest = tw.generate_toyworld(out, **SMALL)
    return out, manifest


def _load(out, name):
    return json.loads((out / name).read_text(encoding="utf-8"))


def _tree_digest(root):
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_deterministic_byte_identical(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    tw.generate_toyworld(again, **SMALL)
    assert _tree_digest(out) == _tree_digest(again)
    other = tmp_path / "other"
    tw.generate_toyworld(other, **{**SMALL, "seed": 4})
    assert (other / "eval.json").read_bytes() != (out / "eval.json").read_bytes()


def test_mmedit_schema(world):
    out, manifest = world
    scenes = _load(out, "scenes.json")
    facts = {f.loc: f.answer for f in tw.text_facts(SMALL["seed"], SMALL["n_facts"])}
    for split, n in (("train.json", SMALL["n_train"]), ("eval.json", SMALL["n_eval"])):
        records = _load(out, split)
        assert isinstance(records, list) and len(records) == n
        for r in records:
            assert isinstance(r, dict)
            assert set(r) == set(tw.MMEDIT_FIELDS)
            assert all(isinstance(v, str) and v for v in r.values())
            qtype = next(t for t, qs in tw.QUESTIONS.items() if r["src"] in qs)
            assert r["rephrase"] in tw.QUESTIONS[qtype] and r["rephrase"] != r["src"]
            assert not r["src"].endswith(tw.VQA_SUFFIX)
            assert r["pred"] != r["alt"]
            assert r["pred"] in tw.ANSWERS[qtype] and r["alt"] in tw.ANSWERS[qtype]
            scene = tw.Scene(**scenes[r["image"]])
            assert scene.answer(qtype) == r["pred"]
            assert tw.Scene(**scenes[r["image_rephrase"]]) == scene
            m_scene = tw.Scene(**scenes[r["m_loc"]])
            assert m_scene.shape != scene.shape and m_scene.color != scene.color
            m_qtype = next(t for t, qs in tw.QUESTIONS.items() if r["m_loc_q"] in qs)
            assert m_qtype != qtype
            assert m_scene.answer(m_qtype) == r["m_loc_a"]
            assert r["loc"].startswith("nq question: ") and not r["loc"].endswith("?")
            assert facts[r["loc"]] == r["loc_ans"]
            for key in ("image", "image_rephrase", "m_loc"):
                assert not os.path.isabs(r[key]) and r[key].startswith("images/")
                with Image.open(out / r[key]) as img:
                    assert img.mode == "RGB" and img.size == (32, 32)
    assert manifest["counts"]["train"] == SMALL["n_train"]
    assert manifest["args"] == tw.toyworld_args(**SMALL)


def test_redraw_differs_but_keeps_colour_and_tint(world):
    out, _ = world
    scenes = _load(out, "scenes.json")
    for r in _load(out, "eval.json") + _load(out, "train.json"):
        a = np.asarray(Image.open(out / r["image"]))
        b = np.asarray(Image.open(out / r["image_rephrase"]))
        assert not np.array_equal(a, b)
        assert scenes[r["image_rephrase"]] == scenes[r["image"]]  # tint included
        colour, tint = scenes[r["image"]]["color"], scenes[r["image"]]["tint"]
        for key in ("image", "image_rephrase"):
            assert tw.classify_color(Image.open(out / r[key])) == colour
            assert tw.classify_tint(Image.open(out / r[key])) == tint
        assert tw.classify_color(Image.open(out / r["m_loc"])) == scenes[r["m_loc"]]["color"]
        assert tw.classify_tint(Image.open(out / r["m_loc"])) == scenes[r["m_loc"]]["tint"]


def _qtype(question):
    return next(t for t, qs in tw.QUESTIONS.items() if question in qs)


def _check_split_guarantees(out, split):
    scenes = _load(out, "scenes.json")
    records = _load(out, split)
    stream = {"train.json": tw._STREAM_TRAIN, "eval.json": tw._STREAM_EVAL}[split]
    seed = tw.read_manifest(out)["args"]["seed"]
    edit_pool, loc_pool = tw.split_scene_pools(stream, seed)
    assert set(edit_pool).isdisjoint(loc_pool) and len(edit_pool) + len(loc_pool) == len(tw.all_scenes())
    pairs = [(tw.Scene(**scenes[r["image"]]), _qtype(r["src"])) for r in records]
    assert len(set(pairs)) == len(pairs)  # no two edits of the split overlap or contradict
    edited = {sc for sc, _ in pairs}
    assert edited <= set(edit_pool)
    loc_scenes = {tw.Scene(**scenes[r["m_loc"]]) for r in records}
    assert loc_scenes <= set(loc_pool) and not loc_scenes & edited
    # Any CHUNK_WINDOW consecutive records differ even ignoring the tint.
    looks = [(sc.look, qt) for sc, qt in pairs]
    for i in range(len(looks)):
        assert looks[i] not in looks[max(0, i - tw.CHUNK_WINDOW + 1):i]
    # No m_loc probe is a look-alike of a nearby edit asked that edit's question type.
    for i, r in enumerate(records):
        probe = (tw.Scene(**scenes[r["m_loc"]]).look, _qtype(r["m_loc_q"]))
        assert probe not in looks[max(0, i - tw.CHUNK_WINDOW + 1):i + tw.CHUNK_WINDOW]
    return pairs


def test_unique_edits_and_disjoint_locality_pool(world):
    out, _ = world
    for split in ("train.json", "eval.json"):
        _check_split_guarantees(out, split)


def test_full_size_eval_split_guarantees(tmp_path):
    """The default eval split (500 records): every guarantee, at full size."""
    out = tmp_path / "big"
    tw.generate_toyworld(out, n_train=0, n_eval=500, seed=0, n_pretrain_scenes=0, n_facts=4)
    pairs = _check_split_guarantees(out, "eval.json")
    assert len({sc.tint for sc, _ in pairs}) == len(tw.TINTS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_sizes_keep_look_alike_edits_a_chunk_apart(seed):
    for stream, n in ((tw._STREAM_TRAIN, 2000), (tw._STREAM_EVAL, 500)):
        edit_pool, _ = tw.split_scene_pools(stream, seed)
        sequence = tw._edit_sequence(edit_pool, n, np.random.default_rng([stream, seed]))
        assert len(set(sequence)) == n and set(sc for sc, _ in sequence) <= set(edit_pool)
        last_seen = {}
        for i, (scene, qtype) in enumerate(sequence):
            key = (scene.look, qtype)
            assert i - last_seen.get(key, -tw.CHUNK_WINDOW) >= tw.CHUNK_WINDOW
            last_seen[key] = i


def test_scene_pools_and_capacity():
    scenes = tw.all_scenes()
    assert len(scenes) == len(set(scenes)) == len(tw.SHAPES) * len(tw.COLORS) * len(tw.COUNT_WORDS) * len(tw.TINTS)
    for stream in (tw._STREAM_TRAIN, tw._STREAM_EVAL):
        edit, loc = tw.split_scene_pools(stream, 0)
        assert (edit, loc) == tw.split_scene_pools(stream, 0)
        assert len(edit) * len(tw.QUESTION_TYPES) == tw.max_edit_records() >= 2000  # the default n_train
        assert set(edit) | set(loc) == set(scenes)
    assert tw.split_scene_pools(tw._STREAM_TRAIN, 0) != tw.split_scene_pools(tw._STREAM_EVAL, 0)
    for name in ("n_train", "n_eval"):
        with pytest.raises(UserError, match=name):
            tw.toyworld_args(**{name: tw.max_edit_records() + 1})
    tw.toyworld_args(n_train=tw.max_edit_records())


def test_tints_light_and_distinct():
    tints = np.asarray(list(tw.TINTS.values()), dtype=float)
    assert len(tints) >= 6 and tints.min() >= 180
    assert ((tints.max(1) - tints.min(1)) / tints.max(1)).max() <= 0.2  # clearly non-saturated
    gaps = np.linalg.norm(tints[:, None] - tints[None], axis=2) + np.eye(len(tints)) * 1e9
    assert gaps.min() >= 15
    colours = np.asarray(list(tw.COLORS.values()), dtype=float)
    assert np.linalg.norm(tints[:, None] - colours[None], axis=2).min() >= 100
    assert tw.Scene("circle", "red", 1) == tw.Scene("circle", "red", 1, "grey")  # old callers keep working
    with pytest.raises(UserError):
        tw.Scene("circle", "red", 1, "neon")


def test_pretraining_covers_every_scene(tmp_path):
    out = tmp_path / "cover"
    n = len(tw.all_scenes())
    tw.generate_toyworld(out, n_train=2, n_eval=2, seed=1, n_pretrain_scenes=n, n_facts=4)
    scenes = _load(out, "scenes.json")
    pre = {tw.Scene(**scenes[it["image"]]) for it in _load(out, "pretrain.json") if it["image"]}
    assert pre == set(tw.all_scenes())  # both pools of both splits


def test_pretrain_items(world):
    out, manifest = world
    items = _load(out, "pretrain.json")
    assert all(set(it) == {"image", "prompt", "target"} for it in items)
    text = [it for it in items if it["image"] is None]
    facts = tw.text_facts(SMALL["seed"], SMALL["n_facts"])
    assert [(t["prompt"], t["target"]) for t in text] == [(f.loc + "?", f.answer) for f in facts]
    vision = [it for it in items if it["image"] is not None]
    assert len(vision) == SMALL["n_pretrain_scenes"] * 2 * sum(len(q) for q in tw.QUESTIONS.values())
    prompts = {it["prompt"] for it in vision}
    assert prompts == {tw.vqa_prompt(q) for qs in tw.QUESTIONS.values() for q in qs}
    assert len(items) == manifest["counts"]["pretrain"]
    # No pretraining image is pixel-identical to an edit-set image.
    edit_paths = {r[k] for s in ("train.json", "eval.json") for r in _load(out, s)
                  for k in ("image", "image_rephrase", "m_loc")}
    edit_px = {Image.open(out / p).tobytes() for p in edit_paths}
    pre_paths = {it["image"] for it in vision}
    assert all(p.startswith("images/pretrain_") for p in pre_paths)
    assert not edit_px & {Image.open(out / p).tobytes() for p in pre_paths}


def test_text_facts_table():
    facts = tw.text_facts(0, 40)
    assert len(facts) == 40 and len({f.question for f in facts}) == 40
    assert facts == tw.text_facts(0, 40)
    for f in facts:
        assert f.loc == "nq question: " + f.question
        assert f.answer.isalpha() and f.answer.islower() and f.answer not in tw.COLORS
    with pytest.raises(UserError):
        tw.text_facts(0, 0)


def test_scene_drawing_sizes_and_count():
    rng = np.random.default_rng(0)
    tints = list(tw.TINTS)
    looks = sorted({sc.look for sc in tw.all_scenes()})
    for size in (32, 64):
        for i, look in enumerate(looks):  # every look, every tint
            scene = tw.Scene(*look, tints[i % len(tints)])
            for jitter in (False, True):
                img = tw.draw_scene(scene, size, rng, jitter=jitter)
                assert img.mode == "RGB" and img.size == (size, size)
                assert tw.classify_color(img) == scene.color
                assert tw.classify_tint(img) == scene.tint
    with pytest.raises(UserError):
        tw.Scene("hexagon", "red", 1)


def test_image_size_64(tmp_path):
    out = tmp_path / "w64"
    tw.generate_toyworld(out, n_train=2, n_eval=2, image_size=64, seed=0, n_pretrain_scenes=1, n_facts=4)
    r = _load(out, "eval.json")[0]
    with Image.open(out / r["image"]) as img:
        assert img.size == (64, 64)


def test_ensure_reuses_and_regenerates(tmp_path):
    out = tmp_path / "data" / "toy"
    args = dict(n_train=3, n_eval=3, image_size=32, seed=0, n_pretrain_scenes=2, n_facts=4)
    assert tw.ensure_toyworld(out, **args) == out
    mtime = (out / "manifest.json").stat().st_mtime_ns
    tw.ensure_toyworld(out, **args)
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    tw.ensure_toyworld(out, **{**args, "n_eval": 4})
    assert len(_load(out, "eval.json")) == 4
    assert tw.read_manifest(out)["args"]["n_eval"] == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy"]  # no temp folders left


def test_ensure_regenerates_unfinished_and_refuses_foreign(tmp_path):
    out = tmp_path / "toy"
    args = dict(n_train=2, n_eval=2, image_size=32, seed=0, n_pretrain_scenes=1, n_facts=4)
    tw.ensure_toyworld(out, **args)
    (out / "manifest.json").write_text(
        json.dumps({**tw.read_manifest(out), "version": -1}), encoding="utf-8")
    tw.ensure_toyworld(out, **args)
    assert tw.read_manifest(out)["version"] == tw.TOYWORLD_VERSION
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError):
        tw.ensure_toyworld(foreign, **args)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError):
        tw.generate_toyworld(foreign, **args)
    with pytest.raises(UserError):
        tw.ensure_toyworld(tmp_path / "bad", **{**args, "image_size": 8})


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = tw.main(["--out", str(out), "--n_train", "2", "--n_eval", "2", "--n_pretrain_scenes", "1",
                  "--n_facts", "4"])
    assert rc == 0 and (out / "manifest.json").exists()
    assert tw.main(["--out", str(out), "--image_size", "4"]) == 2
    assert "image_size" in capsys.readouterr().err


# --------------------------------------------------------------------------- version 4

from toyworld import world_v4 as v4  # noqa: E402

SMALL_V4 = dict(n_train=30, n_eval=24, image_size=32, seed=5, n_pretrain_scenes=8, n_facts=12, version=4)


@pytest.fixture(scope="module")
def world_v4(tmp_path_factory):
    out = tmp_path_factory.mktemp("tw4") / "world"
    manifest = tw.generate_toyworld(out, **SMALL_V4)
    return out, manifest


def test_v4_is_opt_in_and_v3_args_unchanged():
    assert tw.toyworld_args() == {"n_train": 2000, "n_eval": 500, "image_size": 32, "seed": 0,
                                  "n_pretrain_scenes": 1000, "n_facts": 40}
    args = tw.toyworld_args(version=4)
    assert args["version"] == 4 and (args["n_train"], args["n_eval"]) == (4000, 2000)
    with pytest.raises(UserError, match="--version"):
        tw.toyworld_args(version=5)
    with pytest.raises(UserError, match="--n_train 5000"):
        tw.toyworld_args(n_train=5000, version=4)


def test_v4_counts_schema_and_lookalike_file(world_v4):
    out, manifest = world_v4
    assert manifest["version"] == 4
    scenes = _load(out, "scenes.json")
    evals, train, look = _load(out, "eval.json"), _load(out, "train.json"), _load(out, "lookalike.json")
    assert (len(train), len(evals), len(look)) == (30, 24, 24)
    for r in train + evals + look:
        assert set(r) == set(tw.MMEDIT_FIELDS)
        qtype = next(t for t, qs in tw.QUESTIONS.items() if r["src"] in qs)
        scene = v4.SceneV4(**scenes[r["image"]])
        assert scene.answer(qtype) == r["pred"] != r["alt"]
        assert r["alt"] in v4.ANSWERS[qtype]
        m_qtype = next(t for t, qs in tw.QUESTIONS.items() if r["m_loc_q"] in qs)
        assert v4.SceneV4(**scenes[r["m_loc"]]).answer(m_qtype) == r["m_loc_a"]
    for r, e in zip(look, evals):  # the stress split: the eval record, m_loc one attribute away
        assert {k: v for k, v in r.items() if not k.startswith("m_loc")} == \
            {k: v for k, v in e.items() if not k.startswith("m_loc")}
        a, b = v4.SceneV4(**scenes[r["image"]]), v4.SceneV4(**scenes[r["m_loc"]])
        assert v4.attribute_distance(a, b) == 1
        assert next(t for t, qs in tw.QUESTIONS.items() if r["m_loc_q"] in qs) == \
            next(t for t, qs in tw.QUESTIONS.items() if r["src"] in qs)


def test_v4_rephrase_is_same_scene_redrawn(world_v4):
    out, _ = world_v4
    scenes = _load(out, "scenes.json")
    for r in _load(out, "eval.json"):
        assert scenes[r["image"]] == scenes[r["image_rephrase"]]
        a = np.asarray(Image.open(out / r["image"]), dtype=np.float32)
        b = np.asarray(Image.open(out / r["image_rephrase"]), dtype=np.float32)
        assert np.abs(a - b).mean() > 3.0  # re-rendered, not copied


def test_v4_distinctness_and_disjoint_pools(world_v4):
    out, _ = world_v4
    scenes = _load(out, "scenes.json")
    split_scenes = {}
    for split in ("train", "eval"):
        records = _load(out, f"{split}.json")
        edit = [v4.SceneV4(**scenes[r["image"]]) for r in records]
        assert len(set(edit)) == len(edit)  # a unique scene per record
        for block in range(0, len(edit), v4.WINDOW_V4):
            window = edit[block:block + v4.WINDOW_V4]
            assert len({v4.coset_of(s) for s in window}) == 1
        split_scenes[split] = set(edit)
        locs = {v4.SceneV4(**scenes[r["m_loc"]]) for r in records}
        assert not locs & set(edit)
        for m in locs:  # locality scenes are at least two attributes from every edit scene
            assert m.shape in v4.LOC_SHAPES and m.color in v4.LOC_COLORS
            assert min(v4.attribute_distance(m, s) for s in edit) >= 2
    assert not split_scenes["train"] & split_scenes["eval"]


def test_v4_cosets_are_distance_two_codes():
    space = v4.edit_space()
    assert len(space) == 6912 and len(v4.loc_space()) == 768
    by_coset = {}
    for s in space:
        by_coset.setdefault(v4.coset_of(s), []).append(s)
    assert sorted(len(c) for c in by_coset.values()) == [1152] * 6
    # changing any one attribute of a scene leaves its coset (so two scenes of a coset differ in >= 2)
    rng = np.random.default_rng(0)
    for s in [space[int(i)] for i in rng.choice(len(space), 300, replace=False)]:
        for attr in v4.ATTRIBUTES:
            assert v4.coset_of(v4.one_attribute_change(s, attr, rng)) != v4.coset_of(s)


def test_v4_full_size_guarantee_of_scene_order():
    eval_cosets = v4.coset_order(0)[:2]
    scenes = v4.split_scenes(2000, eval_cosets, tw._STREAM_EVAL, 0)
    assert len(set(scenes)) == 2000
    for block in (scenes[:1000], scenes[1000:]):
        arr = np.asarray([[hash(v) for v in s.values()] for s in block])  # [1000, 7]
        dist = (arr[:, None, :] != arr[None, :, :]).sum(-1)  # [1000, 1000]
        assert dist[~np.eye(len(block), dtype=bool)].min() >= 2


def test_v4_deterministic_byte_identical(world_v4, tmp_path):
    out, _ = world_v4
    again = tmp_path / "again"
    tw.generate_toyworld(again, **SMALL_V4)
    assert _tree_digest(out) == _tree_digest(again)


def test_v4_ensure_and_cli(tmp_path, capsys):
    out = tmp_path / "w4"
    args = {k: v for k, v in SMALL_V4.items() if k != "version"}
    argv = ["--out", str(out), "--version", "4"] + [x for k, v in args.items() for x in (f"--{k}", str(v))]
    assert tw.main(argv) == 0
    assert tw.read_manifest(out)["version"] == 4
    stamp = (out / "manifest.json").stat().st_mtime_ns
    tw.ensure_toyworld(out, **SMALL_V4)  # reused, not regenerated
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    from toyworld import ensure_toy_data
    data = tmp_path / "data"
    tw.ensure_toyworld(data / "toyworld", **SMALL_V4)
    ensure_toy_data(str(data))  # a v4 world under data/toyworld is kept, not turned into v3
    assert tw.read_manifest(data / "toyworld")["version"] == 4
    from toyworld import keep_toyworld  # what `python -m runs.pretrain --world <folder>` uses
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert keep_toyworld(out) == str(out) and (out / "manifest.json").stat().st_mtime_ns == stamp
    assert tw.main(["--out", str(tmp_path / "bad"), "--version", "4", "--n_eval", "7000"]) == 2
    assert "--n_train" in capsys.readouterr().err


def test_v4_pretraining_asks_every_attribute(world_v4):
    from runs.pretrain import _load_world
    out, _ = world_v4
    scenes = _load(out, "scenes.json")
    loaded = _load_world(str(out))
    types = set(tw.QUESTION_TYPES) | set(v4.PRETRAIN_QUESTIONS)
    assert len(loaded.images) == 2 * SMALL_V4["n_pretrain_scenes"]
    for path, by_type in zip(loaded.images, loaded.questions):
        assert set(by_type) == types  # no "other": every prompt is recognised
        scene = v4.SceneV4(**scenes[os.path.relpath(path, out)])
        for qtype, rows in by_type.items():
            assert {target for _, target in rows} == {scene.answer(qtype)}
