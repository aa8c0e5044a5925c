"""LiveEdit's Table-2 ablations as config switches (issue 18): -l_sr1, -l_sr2, -SR, HR*.

- the defaults are LiveEdit: training losses, parameters and edited logits are bit-identical to the
  code before the switches (that code is read from git, at BASE_COMMIT);
- the old single `soft_routing_lambda` (YAML and checkpoints written before the split) still loads;
- each switch changes what it should: a loss term absent, equal weights over the selected experts,
  hard routing on the pooled image; and a checkpoint trained with it evaluates.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import make_image, tiny_vllm
from editors.liveedit import ablated_config, ablation_config, ablation_description, ablation_names
from editors.liveedit.config import LiveEditConfig, TrainConfig
from editors.liveedit.editor import LiveEdit
from utils.config import config_to_dict, from_dict, load_config
from utils.errors import UserError
from utils.records import Sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE = "tiny-blip2"
YAML = os.path.join(ROOT, "configs", "liveedit", f"{BACKBONE}.yaml")
BASE_COMMIT = "4d846d105721d9a90419d701335aa666ecfe83eb"  # the last commit before the ablation switches
OLD_PACKAGE = "liveedit_before_ablations"
STEPS = 3


@pytest.fixture(scope="module")
def vllm():
    return tiny_vllm(BACKBONE)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from toyworld.world import generate_toyworld
    from utils.data import load_edit_dataset

    world = tmp_path_factory.mktemp("ablations") / "toyworld"
    generate_toyworld(world, n_train=4, n_eval=2, n_pretrain_scenes=2)
    return load_edit_dataset("TOY", world / "train.json", world)


def base_config() -> LiveEditConfig:
    return load_config(LiveEditConfig, YAML)


def requests(n: int, image_seed: int | None = None) -> list[Sample]:
    """n image requests; with `image_seed` all share one image (only the prompts differ)."""
    return [Sample(f"what shape is item {i}?" + " really" * i + " The answer is:", f"answer {i}",
                   make_image(image_seed if image_seed is not None else 200 + i)) for i in range(n)]


def batch_of(vllm, samples):
    return vllm.prepare([s.prompt for s in samples], [s.image for s in samples], [s.target for s in samples])


def train(editor, records, steps: int = STEPS) -> list[dict]:
    """`steps` training steps, batch i drawn with rng i; returns each step's logged scalars."""
    editor.set_train(True)
    optimizer, scheduler = editor.make_optimizer()
    logs = []
    try:
        for step in range(steps):
            batch = editor.training_batch(records, np.random.default_rng(step))
            optimizer.zero_grad(set_to_none=True)
            logs.append(editor.train_step(batch))
            optimizer.step()
            scheduler.step()
    finally:
        editor.set_train(False)
    return logs


def parameters(editor) -> dict[str, torch.Tensor]:
    return {f"{m}.{n}": p.detach().clone() for m, module in editor.trainable_modules().items()
            for n, p in module.named_parameters()}


def force_routing(editor):
    """Hard routing selects every expert for every image row: with zero value weights the visual features
    are the value bias, b for the input and the prototype, 2b for the edit keys, and <b, 2b> > <b, b>."""
    with torch.no_grad():
        for ext, scale in ((editor.inpt_extractor, 1.0), (editor.edit_extractor, 2.0)):
            ext.ca_vision_info_ext.v_mlp.weight.zero_()
            ext.ca_vision_info_ext.v_mlp.bias.fill_(scale)


# ---- the defaults are LiveEdit, bit for bit ---------------------------------------------------------------

@pytest.fixture(scope="module")
def old_liveedit(tmp_path_factory):
    """editors/liveedit as it was at BASE_COMMIT (from git), importable as package OLD_PACKAGE."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the code before the ablations cannot be read")
    folder = tmp_path_factory.mktemp("before") / OLD_PACKAGE
    folder.mkdir()
    listing = subprocess.run(["git", "-C", ROOT, "ls-tree", "--name-only", BASE_COMMIT, "editors/liveedit/"],
                             capture_output=True, text=True)
    if listing.returncode:
        pytest.skip(f"no git history of {BASE_COMMIT[:7]} in this checkout: {listing.stderr.strip()}")
    for path in listing.stdout.split():
        source = subprocess.run(["git", "-C", ROOT, "show", f"{BASE_COMMIT}:{path}"], capture_output=True,
                                text=True, check=True).stdout
        (folder / os.path.basename(path)).write_text(source)
    (folder / "__init__.py").touch()
    old_yaml = subprocess.run(["git", "-C", ROOT, "show", f"{BASE_COMMIT}:configs/liveedit/{BACKBONE}.yaml"],
                              capture_output=True, text=True, check=True).stdout
    sys.path.insert(0, str(folder.parent))
    try:
        editor_module = importlib.import_module(f"{OLD_PACKAGE}.editor")
        config_module = importlib.import_module(f"{OLD_PACKAGE}.config")
    finally:
        sys.path.remove(str(folder.parent))
    return editor_module.LiveEdit, config_module.LiveEditConfig, yaml.safe_load(old_yaml)


def run_both_ways(editor_class, config, vllm, records):
    """Train STEPS steps from seed 0, then 2 edits: (logs, parameters, edited logits of 3 image prompts)."""
    torch.manual_seed(0)
    editor = editor_class(vllm, config)
    try:
        logs = train(editor, records)
        params = parameters(editor)
        editor.edit(requests(2))
        with torch.no_grad():
            logits = vllm(batch_of(vllm, requests(3))).clone()  # [3, l, V]
        return logs, params, logits
    finally:
        editor.restore()
        editor.remove()


@pytest.mark.parametrize("soft_routing", [None, 0.3], ids=["default", "old-key-0.3"])
def test_default_training_and_inference_are_bit_identical_to_the_code_before(old_liveedit, vllm, records,
                                                                             soft_routing):
    """Same seed, same batches: every logged loss, every parameter after 3 steps and the logits after 2
    edits are equal (not close) to the code before the switches; with the old key `soft_routing_lambda`
    0.3 in the YAML too (the old code read it as the weight of both terms; 0.3 is not a power of two, so
    a regrouped weighted sum could round differently)."""
    old_class, old_config_class, data = old_liveedit
    if soft_routing is not None:
        data = {**data, "train_cfg": {**data["train_cfg"], "soft_routing_lambda": soft_routing}}
    old = run_both_ways(old_class, from_dict(old_config_class, data), vllm, records)
    new = run_both_ways(LiveEdit, from_dict(LiveEditConfig, data), vllm, records)
    assert new[0] == old[0]  # every scalar of every step, keys and values
    assert new[1].keys() == old[1].keys()
    assert all(torch.equal(new[1][k], old[1][k]) for k in old[1]), [k for k in old[1] if not torch.equal(new[1][k], old[1][k])]
    assert torch.equal(new[2], old[2])


def f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def test_default_total_is_the_single_weight_formula(vllm, records):
    """Without git: the logged total is rel + gen + loc + 1 * (relative + absolute) + hard, in float32, exactly."""
    torch.manual_seed(0)
    editor = LiveEdit(vllm, base_config())
    try:
        logs = train(editor, records, steps=1)[0]
    finally:
        editor.remove()
    expected = (1.0 * f32(logs["Reliability loss"]) + 1.0 * f32(logs["Generality loss"])
                + 1.0 * f32(logs["Locality loss"])
                + 1.0 * (f32(logs["MoE soft routing relative loss"]) + f32(logs["MoE soft routing abstract loss"]))
                + 1.0 * f32(logs["MoE hard routing loss"]))
    assert float(expected) == logs["Loss"]


# ---- the old single weight still loads ------------------------------------------------------------------

def write_yaml(path, data) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def yaml_data() -> dict:
    with open(YAML) as f:
        return yaml.safe_load(f)


def old_train_cfg(soft_routing_lambda) -> dict:
    """The tiny YAML's train_cfg written the old way: one soft_routing_lambda, no split weights."""
    train_cfg = {k: v for k, v in yaml_data()["train_cfg"].items() if not k.startswith("soft_routing_")}
    return {**train_cfg, "soft_routing_lambda": soft_routing_lambda}


def test_an_old_yaml_with_soft_routing_lambda_sets_both_weights(tmp_path):
    path = write_yaml(tmp_path / "old.yaml", {**yaml_data(), "train_cfg": old_train_cfg(0.25)})
    config = load_config(LiveEditConfig, path)
    assert (config.train_cfg.soft_routing_abs_lambda, config.train_cfg.soft_routing_rel_lambda) == (0.25, 0.25)
    assert config_to_dict(config)["train_cfg"]["soft_routing_lambda"] is None  # stored once, under the new keys
    assert from_dict(LiveEditConfig, config_to_dict(config)) == config  # a run's config.yaml reads back the same


def test_the_old_key_with_a_new_one_is_refused_naming_both(tmp_path):
    path = write_yaml(tmp_path / "both.yaml",
                      {**yaml_data(), "train_cfg": {**old_train_cfg(0.5), "soft_routing_rel_lambda": 0.0}})
    with pytest.raises(UserError, match=r"both\.yaml.*soft_routing_lambda.*soft_routing_rel_lambda"):
        load_config(LiveEditConfig, path)


def test_a_checkpoint_saved_with_the_old_key_loads(vllm, tmp_path):
    """A checkpoint whose meta.json records `soft_routing_lambda` (and none of the new keys) loads, gets that
    weight for both terms, and does not conflict with today's YAML when its value is the YAML's."""
    from editors import load_editor
    from editors.checkpoint import META_FILE, save_checkpoint

    torch.manual_seed(0)
    editor = LiveEdit(vllm, base_config())
    try:
        folder = save_checkpoint(str(tmp_path / "checkpoints"), editor, None, None, {"step": 1})
    finally:
        editor.remove()
    meta_path = os.path.join(folder, META_FILE)
    for value in (1.0, 0.5):
        with open(meta_path) as f:
            meta = json.load(f)
        old = {k: v for k, v in meta["editor_config"].items() if k not in ("expert_mixing", "visual_key")}
        old["train_cfg"] = {k: v for k, v in old["train_cfg"].items() if not k.startswith("soft_routing_")}
        old["train_cfg"]["soft_routing_lambda"] = value
        meta["editor_config"] = old
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        loaded = load_editor("liveedit", vllm, checkpoint=folder, config_path=YAML if value == 1.0 else None)
        try:
            train_cfg = loaded.config.train_cfg
            assert (train_cfg.soft_routing_abs_lambda, train_cfg.soft_routing_rel_lambda) == (value, value)
            assert (loaded.config.expert_mixing, loaded.config.visual_key) == ("soft", "learned")
        finally:
            loaded.remove()


@pytest.mark.parametrize("key, value", [("expert_mixing", "median"), ("visual_key", "cls"),
                                        ("train_cfg.soft_routing_abs_lambda", -1.0)])
def test_a_bad_ablation_setting_names_the_file_and_key(tmp_path, key, value):
    data = yaml_data()
    if key.startswith("train_cfg."):
        data["train_cfg"][key.split(".")[1]] = value
    else:
        data[key] = value
    path = write_yaml(tmp_path / "bad.yaml", data)
    with pytest.raises(UserError, match=rf"bad\.yaml.*{key.split('.')[-1]}"):
        load_config(LiveEditConfig, path)


# ---- the one map from the paper's rows to config keys ------------------------------------------------------

def test_ablation_config_maps_the_papers_rows():
    assert ablation_names() == ["l_sr1", "l_sr2", "SR", "HR*"]
    assert ablation_config("l_sr1") == {"train_cfg": {"soft_routing_abs_lambda": 0.0}}
    assert ablation_config("-l_sr2") == {"train_cfg": {"soft_routing_rel_lambda": 0.0}}
    assert ablation_config("sr")["expert_mixing"] == "mean"
    assert ablation_config("HR*") == ablation_config("hr") == {"visual_key": "pooled"}
    ablation_config("HR*")["visual_key"] = "changed"  # a copy: the map itself is not changed
    assert ablation_config("HR*") == {"visual_key": "pooled"}
    assert all(ablation_description(name) for name in ablation_names())
    with pytest.raises(UserError, match="unknown LiveEdit ablation 'HR2'.*l_sr1, l_sr2, SR, HR\\*"):
        ablation_config("HR2")
    base = base_config()
    ablated = ablated_config(base, "l_sr1")
    assert ablated.train_cfg.soft_routing_abs_lambda == 0.0 and ablated.train_cfg.soft_routing_rel_lambda == 1.0
    assert ablated.train_cfg.lr == base.train_cfg.lr and base.train_cfg.soft_routing_abs_lambda == 1.0
    assert dataclasses.replace(ablated_config(base, "HR*"), visual_key="learned") == base


# ---- -l_sr1 / -l_sr2: the term is absent ------------------------------------------------------------------

@pytest.mark.parametrize("name, kept, absent", [
    ("l_sr1", "MoE soft routing relative loss", "MoE soft routing abstract loss"),
    ("l_sr2", "MoE soft routing abstract loss", "MoE soft routing relative loss"),
])
def test_a_soft_routing_ablation_drops_its_term(vllm, records, name, kept, absent):
    torch.manual_seed(0)
    editor = LiveEdit(vllm, ablated_config(base_config(), name))
    try:
        logs = train(editor, records, steps=1)[0]
    finally:
        editor.remove()
    assert absent not in logs and kept in logs  # never computed, so never logged
    assert logs["MoE soft routing loss"] == logs[kept]
    expected = (1.0 * f32(logs["Reliability loss"]) + 1.0 * f32(logs["Generality loss"])
                + 1.0 * f32(logs["Locality loss"]) + 1.0 * f32(logs[kept]) + 1.0 * f32(logs["MoE hard routing loss"]))
    assert float(expected) == logs["Loss"]


def test_unequal_soft_routing_weights_scale_each_term(vllm, records):
    config = base_config()
    config.train_cfg.soft_routing_abs_lambda, config.train_cfg.soft_routing_rel_lambda = 0.25, 2.0
    torch.manual_seed(0)
    editor = LiveEdit(vllm, config)
    try:
        logs = train(editor, records, steps=1)[0]
    finally:
        editor.remove()
    expected = (1.0 * f32(logs["Reliability loss"]) + 1.0 * f32(logs["Generality loss"])
                + 1.0 * f32(logs["Locality loss"])
                + (2.0 * f32(logs["MoE soft routing relative loss"]) + 0.25 * f32(logs["MoE soft routing abstract loss"]))
                + 1.0 * f32(logs["MoE hard routing loss"]))
    assert float(expected) == logs["Loss"]


# ---- -SR: the selected experts averaged -------------------------------------------------------------------

QUERY_SIDE = ("layer_norm2", "eqe2", "ca_query_info_ext2")  # the prompt-feature path soft routing reads


def test_mean_mixing_weighs_every_selected_expert_equally(vllm):
    torch.manual_seed(0)
    editor = LiveEdit(vllm, ablated_config(base_config(), "SR"))
    try:
        force_routing(editor)
        editor.edit(requests(3))
        batch = batch_of(vllm, requests(2))
        hidden = editor.edit_layer_output(batch)
        rows, experts, weights = editor.route(hidden, batch)
        assert rows.tolist() == [0, 1] and experts.tolist() == [0, 1, 2]
        assert torch.equal(weights, torch.full((2, 3), 1 / 3))
        with torch.no_grad():
            mean_logits = vllm(batch).clone()
        editor.config = dataclasses.replace(editor.config, expert_mixing="soft")  # same experts, soft weights
        _, _, soft = editor.route(hidden, batch)
        assert not torch.allclose(soft, weights)
        with torch.no_grad():
            assert not torch.allclose(vllm(batch), mean_logits, atol=1e-5)
    finally:
        editor.restore()
        editor.remove()


def test_mean_weights_of_a_partial_selection():
    from editors.liveedit.routing import mean_weights

    selected = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    expected = torch.tensor([[1 / 3, 0, 1 / 3, 1 / 3], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert torch.equal(mean_weights(selected, torch.float32), expected)


def test_mean_mixing_trains_without_the_query_features_and_the_soft_losses_would_change_nothing_else(vllm, records):
    """-SR never reads the prompt features: the query-side parameters get no gradient, and training the row
    with the soft-routing losses on gives the same value of every other parameter (why the row skips them)."""
    runs = {}
    for losses in (0.0, 1.0):
        config = ablated_config(base_config(), "SR")
        config.train_cfg.soft_routing_abs_lambda = config.train_cfg.soft_routing_rel_lambda = losses
        torch.manual_seed(0)
        editor = LiveEdit(vllm, config)
        try:
            train(editor, records, steps=2)
            runs[losses] = parameters(editor)
            if losses == 0.0:
                query_side = [p for ext in (editor.inpt_extractor, editor.edit_extractor)
                              for name, p in ext.named_parameters() if name.startswith(QUERY_SIDE)]
                assert query_side and all(p.grad is None for p in query_side)
        finally:
            editor.remove()
    query_keys = [k for k in runs[0.0] if k.split(".")[1] in QUERY_SIDE]
    others = [k for k in runs[0.0] if k not in query_keys]
    assert others and all(torch.equal(runs[0.0][k], runs[1.0][k]) for k in others)
    assert any(not torch.equal(runs[0.0][k], runs[1.0][k]) for k in query_keys)


# ---- HR*: hard routing on the pooled image ----------------------------------------------------------------

def test_pooled_vision_is_the_extractors_read_out_with_uniform_attention(vllm):
    torch.manual_seed(0)
    editor = LiveEdit(vllm, base_config())
    try:
        ext = editor.inpt_extractor
        vision = torch.randn(2, 5, vllm.hidden_size)  # [b, lv, D]
        mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
        with torch.no_grad():
            ext.ca_vision_info_ext.q_mlp.weight.zero_()  # every score 0: uniform over the unmasked tokens
            ext.ca_vision_info_ext.q_mlp.bias.zero_()
            uniform = ext.read_vision(torch.randn(2, ext.eqe1.shape[1], ext.eqe1.shape[2]), vision, mask)
            assert torch.allclose(ext.pooled_vision(vision, mask), uniform, atol=1e-5)
    finally:
        editor.remove()


def test_pooled_visual_keys_ignore_the_prompt_and_drive_hard_routing(vllm):
    from editors.liveedit.routing import gather_spans, similarity

    torch.manual_seed(0)
    editor = LiveEdit(vllm, ablated_config(base_config(), "HR*"))
    try:
        same_image = requests(2, image_seed=7)  # two prompts, one picture
        batch = batch_of(vllm, same_image)
        hidden = editor.edit_layer_output(batch)  # [2, l, D]
        keys = editor.make_edit_keys(hidden, batch)["vision_keys"]  # [2, e, md]
        assert torch.equal(keys[0], keys[1])  # no prompt in the key
        vision, _ = gather_spans(hidden, batch.vision_spans)  # [2, n_img, D]
        ext = editor.edit_extractor
        explicit = ext.ca_vision_info_ext.v_mlp(ext.layer_norm1(vision).mean(1))  # [2, md]
        assert torch.allclose(keys, explicit[:, None].expand_as(keys), atol=1e-6)
        learned = dataclasses.replace(editor.config, visual_key="learned")
        editor.config = learned
        assert not torch.allclose(*editor.make_edit_keys(hidden, batch)["vision_keys"], atol=1e-6)
        editor.config = dataclasses.replace(learned, visual_key="pooled")

        editor.edit(requests(4))
        probe = batch_of(vllm, requests(3) + same_image)
        hidden = editor.edit_layer_output(probe)
        vision, _ = gather_spans(hidden, probe.vision_spans)
        inp = editor.inpt_extractor
        pooled_in = inp.ca_vision_info_ext.v_mlp(inp.layer_norm1(vision).mean(1))[:, None]  # [5, 1, md]
        prototype = inp.ca_vision_info_ext.v_mlp(inp.layer_norm1(inp.vis_rep_prot).mean(1))[:, None]  # [1, 1, md]
        stored = editor.repository.view("vision_keys")[:, :1]  # [4, 1, md]
        selected = similarity(pooled_in, stored, editor.sim_scale) > similarity(pooled_in, prototype,
                                                                                editor.sim_scale)  # [5, 4]
        force_to = torch.zeros(5, 4, dtype=torch.bool)
        rows, experts, weights = editor.route(hidden, probe)
        force_to[rows[:, None], experts[None, :]] = weights > 0
        assert torch.equal(force_to, selected)
        assert torch.equal(force_to[3], force_to[4])  # the same picture routes the same, whatever the prompt
    finally:
        editor.restore()
        editor.remove()


# ---- a checkpoint trained with each ablation evaluates --------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("ablation_runs")
    generate_toyworld(root / "data" / "toyworld", n_train=4, n_eval=4, n_pretrain_scenes=2)
    return root


@pytest.mark.parametrize("name", ["l_sr1", "l_sr2", "SR", "HR*"])
def test_a_checkpoint_trained_with_the_ablation_evaluates(workspace, tmp_path, name):
    from editors.liveedit.ablations import merge_overrides
    from runs.eval_config import EvalConfig
    from runs.eval_run import run_evaluation
    from runs.train_config import TrainRunConfig
    from runs.training import run_training

    config_path = write_yaml(tmp_path / "ablated.yaml", merge_overrides(yaml_data(), ablation_config(name)))
    trained = run_training(TrainRunConfig(
        editor_name="liveedit", model_name=BACKBONE, data_name="TOY", batch_size=2, max_steps=3, save_every=3,
        seed=1, data_buffer_size=0, config_path=config_path, records_dir=str(tmp_path / "records"),
        data_dir=str(workspace / "data")), echo=None)
    with open(os.path.join(trained.final_checkpoint, "meta.json")) as f:
        recorded = json.load(f)["editor_config"]
    assert merge_overrides(recorded, ablation_config(name)) == recorded  # the checkpoint carries the ablation
    outcome = run_evaluation(EvalConfig(
        sequential_edit_n=2, editor_name="liveedit", model_name=BACKBONE, data_name="TOY",
        editor_checkpoint=trained.final_checkpoint, data_dir=str(workspace / "data"),
        results_dir=str(tmp_path / "results"), show_progress=False, exact_match=False, tensorboard=False,
        plot=False))
    mean = outcome.total_mean
    assert outcome.chunks_run == 2 and mean["total_edit_n"] == 4
    scores = [mean["reliability"]["acc"], *(g["acc"] for g in mean["generality"].values()),
              *(g["acc"] for g in mean["locality"].values())]
    assert len(scores) == 5 and all(0.0 <= s <= 1.0 for s in scores), mean  # Rel, T-/M-Gen, T-/M-Loc
    assert os.path.isfile(os.path.join(outcome.folder, "mean_results.json"))
