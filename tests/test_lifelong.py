"""run_lifelong.py: the plan, and the whole command end to end on a tiny version-4 world (random tiny-blip2,
two training seeds of 2 steps, every evaluation capped at 4 records)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runs.lifelong.plan import LifelongConfig, build_jobs
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_has_every_evaluation_per_seed_and_checks_its_flags():
    jobs = build_jobs(LifelongConfig())
    names = [j.name for j in jobs]
    assert sum(j.kind == "train" for j in jobs) == 3 and "pretrain-tiny-blip2" in names
    assert sum(j.kind == "eval" for j in jobs) == 1 + 3 * 5  # the unedited backbone + 5 evaluations per seed
    life = next(j for j in jobs if j.name == "eval-tiny-blip2-liveedit-s1-lifelong")
    assert "--lifelong" in life.argv and life.argv[life.argv.index("--records") + 1] == "2000"
    assert life.argv[life.argv.index("--train_seed") + 1] == "1" and "train-tiny-blip2-s1" in life.deps
    look = next(j for j in jobs if j.name == "eval-tiny-blip2-liveedit-s0-lookalike")
    assert "lookalike" in look.deps and look.argv[look.argv.index("--data_dir") + 1].endswith("lookalike")
    # capped, the evaluations that become the same one are run once
    capped = LifelongConfig(max_records=4).evaluations()
    assert [(e.name, e.edits, e.records) for e in capped] == [("1", 1, 4), ("100", 4, 4), ("lifelong", 4, 4),
                                                                ("lookalike", 4, 4)]
    with pytest.raises(UserError, match="distinct"):
        LifelongConfig(seeds=(1, 1))
    with pytest.raises(UserError, match="not a tiny backbone"):
        LifelongConfig(backbones=("llava-v1.5-7b",))


def test_the_command_on_a_tiny_world(tmp_path):
    from toyworld.world import generate_toyworld

    data = tmp_path / "data"
    generate_toyworld(str(data / "toyworld"), n_train=16, n_eval=8, n_pretrain_scenes=4, n_facts=12, version=4)
    out, doc = tmp_path / "out", tmp_path / "LIFELONG.md"
    doc.write_text("# notes written by hand\n")
    cmd = [sys.executable, os.path.join(ROOT, "run_lifelong.py"), "--no_pretrain", "--out_dir", str(out),
           "--data_dir", str(data), "--doc", str(doc), "--seeds", "0", "1", "--train_steps", "2",
           "--max_records", "4", "--no_progress"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((out / "summary.json").read_text())["tiny-blip2"]
    assert set(table) == {"unedited", "1", "100", "lifelong", "lookalike"}
    assert table["unedited"]["rel"] <= 0.5 and table["unedited"]["t_loc"] == 1.0
    at_4 = table["100"]
    assert at_4["seeds"] == [0, 1] and at_4["edits"] == 4 and at_4["records"] == 4
    assert all(0.0 <= at_4[k] <= 1.0 for k in ("rel", "t_gen", "m_gen", "t_loc", "m_loc")) and "std" in at_4
    routing = at_4["routing"]  # 2 training steps: any value, but every diagnostic is there
    assert 0.0 <= routing["rel"]["selected_mean"] <= 4 and 0.0 <= routing["m_gen"]["own_weight"] <= 1.0
    assert 0.0 <= routing["m_loc"]["routed"] <= 1.0
    curve = table["lifelong"]["curve"]
    assert [p["edits"] for p in curve] == [1, 4] and curve[-1]["rel"] == table["lifelong"]["rel"]
    # the look-alike split is the eval split with m_loc swapped for a probe one attribute away
    look = out / "lookalike" / "toyworld"
    assert json.loads((look / "eval.json").read_text()) == json.loads((data / "toyworld" / "lookalike.json").read_text())
    text = doc.read_text()
    assert text.startswith("# notes written by hand") and "<!-- out-results:start -->" in text
    assert "| -sen 4, 4 records |" in text and "--lifelong -sen 4 over 4, after 1 |" in text
    assert (tmp_path / "figures" / "lifelong-tiny-blip2.png").stat().st_size > 1000
    # a second call runs nothing and rewrites only the results section
    doc.write_text(text + "\nKEEP ME\n")
    log_time = os.path.getmtime(out / "logs" / "train-tiny-blip2-s1.log")
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert os.path.getmtime(out / "logs" / "train-tiny-blip2-s1.log") == log_time
    again = doc.read_text()
    assert "KEEP ME" in again and again.count("<!-- out-results:start -->") == 1
    # asking for a seed that never ran keeps the rows of the seeds that did, and says which they are
    third = subprocess.run(cmd[:cmd.index("--seeds")] + ["--seeds", "0", "1", "2", "--train_steps", "2",
                                                          "--max_records", "4", "--report_only"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["tiny-blip2"]["100"]["seeds"] == [0, 1]
    partial = doc.read_text()
    assert "Training seeds in these rows: 0, 1." in partial and "| -sen 4, 4 records |" in partial
    assert "training seeds requested: [0, 1, 2]" in partial
