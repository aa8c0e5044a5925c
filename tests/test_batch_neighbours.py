"""`--batch_neighbours K`: batches of anchors plus their visual nearest neighbours (runs/neighbours.py).

Real LiveEdit on the tiny-blip2 backbone over a small toy world: K = 0 keeps today's order and losses
bit for bit, K > 0 puts each anchor's nearest records (by the cached visual keys) in its batch, and a
run resumed mid-epoch reproduces the losses of the uninterrupted run.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from runs.neighbours import (NEIGHBOURS_DIR, anchors_per_batch, cached_visual_keys, compose_batch, neighbour_table,
                             table_width, visual_keys)
from runs.training import TrainRunConfig, batch_indices, epoch_order, run_training, steps_per_epoch
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, BS, K, SEED = 12, 4, 1, 5
STEPS = 9   # K=1, B=4: 2 anchors per batch, 6 steps per epoch; step 9 is mid-epoch 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from toyworld.world import generate_toyworld

    root = tmp_path_factory.mktemp("neighbours")
    generate_toyworld(str(root / "toyworld"), n_train=N_TRAIN, n_eval=4, n_pretrain_scenes=2)
    return str(root)


def run_cfg(data_root, records_dir, **overrides) -> TrainRunConfig:
    settings = dict(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY", batch_size=BS,
                    data_dir=data_root, records_dir=records_dir, max_steps=STEPS, seed=SEED, save_every=4,
                    data_buffer_size=2, batch_neighbours=K)
    settings.update(overrides)
    return TrainRunConfig(**settings)


# ---- the data order, pure functions ----------------------------------------------------------------

def test_zero_neighbours_is_todays_order():
    """K = 0: the same indices as the uniform order (slices of the epoch permutation)."""
    n, bs, seed = 10, 4, 7
    assert steps_per_epoch(n, bs, 0) == steps_per_epoch(n, bs) == 3
    for step in range(1, 7):
        epoch, ids = batch_indices(seed, step, n, bs, 0, None)
        within = (step - 1) % 3
        assert np.array_equal(ids, epoch_order(seed, epoch, n)[within * bs:(within + 1) * bs])


def test_compose_batch_anchor_then_nearest_without_repeats():
    # 1-D keys on a circle: the nearest records of i are i+-1, then i+-2, ...
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    keys = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)  # [12, 2]
    table = neighbour_table(keys, table_width(8, 3))  # [12, 10]
    assert set(table[0, :2]) == {1, 11} and set(table[0, 2:4]) == {2, 10}
    assert all(i not in row for i, row in enumerate(table))
    batch = compose_batch(np.array([0, 1]), table, 3, 8)
    assert len(batch) == len(set(batch.tolist())) == 8
    assert batch[0] == 0 and set(batch[1:4]) == {11, 2, 10}   # 1 is an anchor itself: skipped, next nearest
    assert batch[4] == 1 and set(batch[5:7]) == {3, 4} and batch[7] in (5, 9)   # 0, 2, 10, 11 taken
    assert anchors_per_batch(8, 3) == 2 and anchors_per_batch(8, 2) == 3 and anchors_per_batch(8, 0) == 8
    assert len(compose_batch(np.array([0, 4, 8]), table, 2, 8)) == 8   # 9 records cut to B


def test_every_record_anchors_once_per_epoch():
    n, bs, k, seed = 10, 6, 2, 3
    table = neighbour_table(np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32), table_width(bs, k))
    per_epoch = steps_per_epoch(n, bs, k)
    assert per_epoch == 5   # 2 anchors per batch
    anchors = [batch_indices(seed, s, n, bs, k, table)[1][[0, 3]] for s in range(1, per_epoch + 1)]
    assert sorted(np.concatenate(anchors).tolist()) == list(range(n))
    again = [batch_indices(seed, s, n, bs, k, table)[1] for s in range(1, per_epoch + 1)]
    assert all(np.array_equal(a[[0, 3]], b) for a, b in zip(again, anchors))   # pure function of the step


def test_cached_keys_are_reused_and_a_damaged_file_is_replaced(tmp_path):
    made = []

    def compute():
        made.append(1)
        return np.eye(3, dtype=np.float32)

    keys, path, reused = cached_visual_keys(str(tmp_path), "abc", compute, 3)
    assert not reused and os.path.basename(path) == "visual-keys-abc.npy" and len(made) == 1
    assert np.array_equal(cached_visual_keys(str(tmp_path), "abc", compute, 3)[0], keys) and len(made) == 1
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY half a file")
    again, _, reused = cached_visual_keys(str(tmp_path), "abc", compute, 3)
    assert not reused and np.array_equal(again, keys) and len(made) == 2
    assert np.array_equal(np.load(path), keys)   # replaced by a whole file
    assert not [n for n in os.listdir(os.path.dirname(path)) if n != "visual-keys-abc.npy"]   # no temporary left


def test_flag_checks_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="--batch_neighbours must be 0 or more"):
        run_cfg(str(tmp_path), str(tmp_path), batch_neighbours=-1)
    with pytest.raises(UserError, match=r"--batch_neighbours 4 must be smaller than -bs/--batch_size 4"):
        run_cfg(str(tmp_path), str(tmp_path), batch_neighbours=4)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_vllm_editor.py"), "-en", "liveedit", "-mn",
                           "tiny-blip2", "-dna", "TOY", "-bs", "2", "--batch_neighbours", "3",
                           "--data_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: --batch_neighbours 3 must be smaller than -bs/--batch_size 2" in proc.stderr


# ---- real LiveEdit runs ----------------------------------------------------------------------------

def test_zero_is_bit_identical_to_no_flag(data_root, tmp_path):
    """The flag at 0 (given explicitly) and a config without it train the same losses, bit for bit."""
    plain = run_training(TrainRunConfig(editor_name="liveedit", model_name="tiny-blip2", data_name="TOY",
                                        batch_size=BS, data_dir=data_root, records_dir=str(tmp_path / "a"),
                                        max_steps=4, seed=SEED), echo=None)
    zero = run_training(run_cfg(data_root, str(tmp_path / "b"), batch_neighbours=0, max_steps=4), echo=None)
    assert plain.losses == zero.losses and len(plain.losses) == 4
    assert not os.path.exists(os.path.join(plain.run_dir, NEIGHBOURS_DIR))
    with open(os.path.join(zero.run_dir, "config.yaml")) as f:
        assert set(yaml.safe_load(f)["data"]) == {"num_records", "steps_per_epoch", "total_steps"}


def test_batches_hold_nearest_records_and_resume_is_exact(data_root, tmp_path):
    from editors.vllms import load_vllm
    from runs.data import load_split

    full = run_training(run_cfg(data_root, str(tmp_path / "full")), echo=None)
    assert sorted(full.losses) == list(range(1, STEPS + 1))
    with open(os.path.join(full.run_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["run"]["batch_neighbours"] == K
    assert config["data"]["steps_per_epoch"] == N_TRAIN // anchors_per_batch(BS, K)
    cached = os.path.join(full.run_dir, config["data"]["visual_keys"])
    keys = np.load(cached)
    _, records = load_split("TOY", "train", data_root, None)
    assert np.allclose(keys, visual_keys(load_vllm("tiny-blip2"), records), atol=1e-6)   # the key it says it is
    table = neighbour_table(keys, table_width(BS, K))
    for step in (1, 2, 7):  # anchors at 0 and 2, each followed by its nearest record not already in the batch
        ids = batch_indices(SEED, step, N_TRAIN, BS, K, table)[1]
        assert len(set(ids.tolist())) == len(ids) == BS
        assert ids[1] == next(j for j in table[ids[0]] if j != ids[2])
        assert ids[3] == next(j for j in table[ids[2]] if j not in ids[:2])

    # stop at step 4, resume mid-epoch: same losses afterwards, keys read back from the cache
    os.remove(cached)
    part = run_training(run_cfg(data_root, str(tmp_path / "part"), max_steps=4), echo=None)
    lines: list[str] = []
    resumed = run_training(run_cfg(data_root, str(tmp_path / "part"), resume_from=part.final_checkpoint),
                           echo=lines.append)
    assert sorted(resumed.losses) == list(range(5, STEPS + 1))
    assert {s: part.losses[s] for s in range(1, 5)} == {s: full.losses[s] for s in range(1, 5)}
    assert {s: resumed.losses[s] for s in range(5, STEPS + 1)} == {s: full.losses[s] for s in range(5, STEPS + 1)}
    assert any("visual keys read from" in line for line in lines), lines

    with pytest.raises(UserError, match="trained with --batch_neighbours 1, but this run asks for 0"):
        run_training(run_cfg(data_root, str(tmp_path / "part"), batch_neighbours=0,
                             resume_from=part.final_checkpoint), echo=None)
