"""run_tables.py: the job runner, the report's arithmetic, the seeded record draw, and --quick end to end
on a tiny subset (a small toy world, random tiny-blip2, three editors, 2 training steps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runs.data import draw_records
from runs.pretrain import config_for, recipe_key
from runs.tables.jobs import run_jobs, run_recorded
from runs.tables.plan import Job, TablesConfig, build_jobs
from runs.tables.report import _entry
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _writer(marker: str, fail: bool = False) -> list[str]:
    code = "import sys; sys.exit(3)" if fail else f"open({marker!r}, 'w').write('{{}}')"
    return [sys.executable, "-c", code]


def test_runner_skips_finished_reruns_changed_and_blocks_dependants(tmp_path):
    out = str(tmp_path)
    marks = {n: str(tmp_path / f"{n}.done") for n in "abcd"}
    jobs = [Job("a", _writer(marks["a"]), marks["a"]),
            Job("b", _writer(marks["b"], fail=True), marks["b"]),
            Job("c", _writer(marks["c"]), marks["c"], deps=("b",)),
            Job("d", _writer(marks["d"]), marks["d"], deps=("a",))]
    first = run_jobs(jobs, out, workers=2, show_progress=False)
    assert sorted(first.ran) == ["a", "d"] and list(first.failed) == ["b"] and first.blocked == ["c"]
    assert open(first.failed["b"]).readline().startswith("-c ")
    jobs[1] = Job("b", _writer(marks["b"]), marks["b"])
    second = run_jobs(jobs, out, workers=2, show_progress=False)
    assert sorted(second.skipped) == ["a", "d"] and sorted(second.ran) == ["b", "c"]
    # the same name with another command (another setting) is not finished, even though its marker exists,
    # and neither is the job that used its output
    jobs[0] = Job("a", _writer(marks["a"]) + ["# changed"], marks["a"])
    third = run_jobs(jobs, out, workers=1, show_progress=False)
    assert third.ran == ["a", "d"] and sorted(third.skipped) == ["b", "c"]
    assert run_jobs(jobs, out, workers=1, show_progress=False).ran == []


def test_a_clone_with_only_the_results_reruns_what_an_unfinished_result_needs(tmp_path):
    # git keeps the cells and jobs.json, not the trained editor: on another machine, a training is run
    # again only for a cell it still owes, and never for cells that are finished
    out = str(tmp_path)
    marks = {n: str(tmp_path / f"{n}.done") for n in ("world", "train", "cell1", "cell2", "cell3")}
    jobs = [Job("world", _writer(marks["world"]), marks["world"]),
            Job("train", _writer(marks["train"]), marks["train"], deps=("world",)),
            Job("cell1", _writer(marks["cell1"]), marks["cell1"], deps=("train",)),
            Job("cell2", _writer(marks["cell2"]), marks["cell2"], deps=("train",)),
            Job("cell3", _writer(marks["cell3"]), marks["cell3"], deps=("world",))]
    assert sorted(run_jobs(jobs, out, workers=2, show_progress=False).ran) == sorted(marks)
    for name in ("world", "train"):  # what a clone lacks
        os.remove(marks[name])
    clone = run_jobs(jobs, out, workers=2, show_progress=False)
    assert clone.ran == [] and sorted(clone.skipped) == sorted(marks)
    assert not os.path.exists(marks["train"])
    os.remove(marks["cell2"])  # a cell still owed: its training and the world are run again, cell1 is not
    again = run_jobs(jobs, out, workers=2, show_progress=False)
    assert again.ran == ["world", "train", "cell2"] and sorted(again.skipped) == ["cell1", "cell3"]


def test_ready_results_run_before_trainings(tmp_path):
    # one worker: after the world, the cell that needs no training runs before the long training, so a
    # stopped run leaves as few trainings as it can whose cells are still owed
    out = str(tmp_path)
    marks = {n: str(tmp_path / f"{n}.done") for n in ("world", "train", "cell_trained", "cell_alone")}
    jobs = [Job("world", _writer(marks["world"]), marks["world"]),
            Job("train", _writer(marks["train"]), marks["train"], deps=("world",), cost_s=500),
            Job("cell_trained", _writer(marks["cell_trained"]), marks["cell_trained"], deps=("train",), cost_s=5),
            Job("cell_alone", _writer(marks["cell_alone"]), marks["cell_alone"], deps=("world",), cost_s=5)]
    assert run_jobs(jobs, out, workers=1, show_progress=False).ran == ["world", "cell_alone", "train", "cell_trained"]


def test_plan_marks_finished_and_unneeded_jobs(tmp_path, capsys):
    from runs.tables.jobs import print_plan

    out = str(tmp_path)
    marks = {n: str(tmp_path / f"{n}.done") for n in ("train", "cell1", "cell2")}
    jobs = [Job("train", _writer(marks["train"]), marks["train"], cost_s=3600),
            Job("cell1", _writer(marks["cell1"]), marks["cell1"], deps=("train",), cost_s=3600),
            Job("cell2", _writer(marks["cell2"]), marks["cell2"], cost_s=3600)]
    run_jobs(jobs[:2], out, workers=1, show_progress=False)
    os.remove(marks["train"])
    print_plan(jobs, out, workers=1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2:] == ["-", "train"] and lines[1].split()[2:] == ["done", "cell1"]
    assert lines[2].split()[2:] == ["cell2"]
    assert lines[3].startswith("3 jobs, 1 left to run, about 1.0 h with 1 at once")


def test_entry_is_mean_and_sample_std_over_seeds():
    cells = [{"rel": 1.0, "t_gen": 0.5, "m_gen": 0.5, "t_loc": 1.0, "m_loc": 1.0, "edit_s": 0.1, "peak_mb": 300,
              "records": 4, "seed": 0},
             {"rel": 0.5, "t_gen": 0.5, "m_gen": 0.0, "t_loc": 1.0, "m_loc": 0.5, "edit_s": 0.3, "peak_mb": 350,
              "records": 4, "seed": 1}]
    e = _entry(cells)
    assert e["rel"] == 0.75 and e["m_gen"] == 0.25 and e["std"]["t_gen"] == 0.0
    assert e["std"]["rel"] == pytest.approx(0.3536, abs=1e-4)  # stdev([1, .5]) = .5 / sqrt(2)
    assert e["avg"] == pytest.approx((0.8 + 0.5) / 2) and e["std"]["avg"] == pytest.approx(0.2121, abs=1e-4)
    assert e["edit_s"] == pytest.approx(0.2) and e["peak_mb"] == 350 and e["seeds"] == [0, 1]


def test_draw_records_is_a_seeded_permutation():
    records = list(range(50))
    a, b = draw_records(records, 1, 10), draw_records(records, 2, 10)
    assert a == draw_records(records, 1, 10) and a != b and len(set(a)) == 10
    assert sorted(draw_records(records, 3, None)) == records and draw_records(records, 3, None) != records


def test_plan_counts_and_checks():
    cfg = TablesConfig()
    jobs = build_jobs(cfg)
    names = {j.name for j in jobs}
    # 11 editors x 4 points x 3 seeds x 2 backbones + unedited + 4 ablations x 3 seeds
    assert sum(j.kind == "eval" for j in jobs) == 11 * 4 * 3 * 2 + 2 * 3 + 4 * 3
    assert "eval-tiny-blip2-liveedit-HRstar-1000-s2" in names and "train-tiny-llava-mend_vl" in names
    at_1000 = next(j for j in jobs if j.name == "eval-tiny-llava-grace-1000-s0")
    assert at_1000.meta["records"] == 1000 and "--edits" in at_1000.argv
    # a pretraining job names its recipe, so a changed recipe reruns it and all that used its backbone
    pre = next(j for j in jobs if j.name == "pretrain-tiny-blip2")
    assert pre.argv[pre.argv.index("--recipe") + 1] == recipe_key(config_for("tiny-blip2", cfg.world_version))
    assert "--vision_steps" not in pre.argv
    # --quick pretrains with the default recipe's 1,000 phase-1 steps: another recipe, another cache entry
    quick = next(j for j in build_jobs(TablesConfig.quick_defaults()) if j.kind == "pretrain")
    assert quick.argv[quick.argv.index("--vision_steps") + 1] == "1000"
    assert quick.argv[quick.argv.index("--recipe") + 1] == recipe_key(
        config_for("tiny-blip2", cfg.world_version, vision_steps=1000)) != recipe_key(config_for("tiny-blip2", 4))
    with pytest.raises(UserError, match="fewer records than edits"):
        TablesConfig(records=50, points=(1, 100))
    with pytest.raises(UserError, match="ablation"):
        TablesConfig(ablations=("no_such",))


def test_quick_on_a_tiny_subset(tmp_path):
    from toyworld.world import generate_toyworld

    data = tmp_path / "data"
    generate_toyworld(str(data / "toyworld"), n_train=16, n_eval=8, n_pretrain_scenes=2)
    out, doc = tmp_path / "out", tmp_path / "TABLES.md"
    cmd = [sys.executable, os.path.join(ROOT, "run_tables.py"), "--quick", "--no_pretrain", "--out_dir", str(out),
           "--data_dir", str(data), "--doc", str(doc), "--editors", "liveedit", "serac_vl", "ft_l",
           "--points", "1", "2", "--ablations", "HR*", "--records", "4", "--records_slow", "4", "--train_steps", "ALL=2", "--no_progress"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"tiny-blip2"}
    assert set(summary["tiny-blip2"]) == {"none", "liveedit", "serac_vl", "ft_l", "liveedit-HR*"}
    assert set(summary["tiny-blip2"]["liveedit-HR*"]) == {"2"}  # ablations only at the largest point
    ablation_cfg = (out / "configs" / "liveedit-HRstar-tiny-blip2.yaml").read_text()
    assert "visual_key: pooled" in ablation_cfg
    cell = summary["tiny-blip2"]["liveedit"]["2"]
    assert set(cell) >= {"rel", "t_gen", "m_gen", "t_loc", "m_loc", "avg", "std", "edit_s", "peak_mb", "records"}
    assert all(0.0 <= cell[k] <= 1.0 for k in ("rel", "t_gen", "m_gen", "t_loc", "m_loc"))
    assert cell["records"] == 4 and cell["peak_mb"] > 0 and cell["edit_s"] is not None
    text = doc.read_text()
    assert "Table 1" in text and "| 2 | **LiveEdit** |" in text and "<!-- analysis:start -->" in text
    assert "| LiveEdit HR* |" in text and "Table 2" in text
    # unedited 1 + 3 editors x 2 points + 1 ablation, one seed
    assert "- cells finished: 8 of 8\n" in text
    assert (tmp_path / "figures" / "tables-tiny-blip2.png").stat().st_size > 1000
    ledger = json.loads((out / "jobs.json").read_text())
    assert "train-tiny-blip2-serac_vl" in ledger and "eval-tiny-blip2-ft_l-2-s0" in ledger
    # the cell's evaluation can be rerun by hand: its log starts with the command
    assert (out / "logs" / "eval-tiny-blip2-ft_l-2-s0.log").read_text().startswith("-m runs.tables.stage eval")
    # a second call finds everything finished and runs nothing; the hand-written analysis survives
    doc.write_text(text.replace("(Written by hand", "KEEP ME (Written by hand"))
    log_time = os.path.getmtime(out / "logs" / "train-tiny-blip2-liveedit.log")
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert os.path.getmtime(out / "logs" / "train-tiny-blip2-liveedit.log") == log_time
    assert "KEEP ME" in doc.read_text()


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_bad_flags_and_a_too_small_world_are_one_error_line(tmp_path):
    from toyworld.world import generate_toyworld

    bad = _run(["run_tables.py", "--plan", "--train_steps", "liveedit=x"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: --train_steps") and "Traceback" not in bad.stderr
    bad = _run(["run_tables.py", "--plan", "--model_path", "tiny-blip2"])
    assert bad.returncode == 2 and "BACKBONE=FOLDER" in bad.stderr
    generate_toyworld(str(tmp_path / "toyworld"), n_train=8, n_eval=8, n_pretrain_scenes=2)
    small = _run(["-m", "runs.tables.stage", "world", "--data_dir", str(tmp_path), "--need_eval", "1000"])
    assert small.returncode == 2 and "has 8 eval records, the tables need 1000" in small.stderr
    assert (tmp_path / "toyworld" / "eval.json").is_file()  # kept, never replaced


def test_a_runner_killed_outright_keeps_the_time_of_its_finished_jobs(tmp_path):
    # job "slow" sleeps 1 s and finishes; job "kill" then SIGKILLs the runner itself (no finally runs)
    done = str(tmp_path / "slow.done")
    script = f"""
import signal, sys
from runs.tables.jobs import run_recorded
from runs.tables.plan import Job
slow = Job("slow", [sys.executable, "-c", "import time; time.sleep(1); open({done!r}, 'w').write('{{}}')"], {done!r})
kill = Job("kill", [sys.executable, "-c", "import os, signal; os.kill(os.getppid(), signal.SIGKILL)"],
           {str(tmp_path / 'never')!r}, deps=("slow",))
run_recorded([slow, kill], {str(tmp_path)!r}, 1, show_progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["wall_s_all_calls"] >= 1.0 and [c[:7] for c in info["commands"]] == ["python "] and len(info["commits"]) == 1
    assert list(json.loads((tmp_path / "jobs.json").read_text())) == ["slow"]


def test_run_info_keeps_every_distinct_command(tmp_path, monkeypatch):
    """A run split into subset calls (say --backbones tiny-blip2, then tiny-llava) names each call's command
    and job count; a report-only call adds neither."""
    for argv, workers in ((["run_tables.py", "--backbones", "tiny-blip2"], 1),
                          (["run_tables.py", "--backbones", "tiny-llava"], 2),
                          (["run_tables.py", "--backbones", "tiny-blip2"], 1)):
        monkeypatch.setattr(sys, "argv", argv)
        _, provenance = run_recorded([], str(tmp_path), workers, show_progress=False)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["commands"] == ["python run_tables.py --backbones tiny-blip2", "python run_tables.py --backbones tiny-llava"]
    assert provenance["commands (every call's, first to last)"] == "; ".join(info["commands"])
    _, provenance = run_recorded([], str(tmp_path), 4, show_progress=False, report_only=True)
    assert provenance["jobs at once"] == "1, 2"  # the runs' own, not the report call's


def test_a_cell_on_another_backbone_starts_over_and_trainings_resume_only_their_own(tmp_path):
    """A changed pretraining recipe gives the backbone another folder: a cell's earlier evaluation folder is
    then stale and started over (an interrupted one on the same backbone resumes), and an earlier training
    of the row is resumed only if it ran on the same backbone folder and editor config."""
    import yaml

    from editors.vllms import load_vllm, save_vllm
    from runs.tables.plan import backbone_marker
    from runs.tables.stage import _resumable
    from toyworld.world import generate_toyworld

    data, out = tmp_path / "data", tmp_path / "out"
    generate_toyworld(str(data / "toyworld"), n_train=4, n_eval=4, n_pretrain_scenes=2)
    vllm = load_vllm("tiny-blip2")
    folders = [str(tmp_path / "old-recipe"), str(tmp_path / "new-recipe")]
    cell = out / "cells" / "tiny-blip2" / "none" / "1-s0.json"
    for folder in folders:
        save_vllm(vllm, folder)
        os.makedirs(os.path.dirname(backbone_marker(str(out), "tiny-blip2")), exist_ok=True)
        with open(backbone_marker(str(out), "tiny-blip2"), "w") as f:
            json.dump({"folder": folder}, f)
        proc = _run(["-m", "runs.tables.stage", "eval", "--backbone", "tiny-blip2", "--editor", "none", "--row", "none",
                     "--edits", "1", "--records", "2", "--seed", "0", "--data_dir", str(data), "--out", str(out),
                     "--pretrained"], env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        results = json.loads(cell.read_text())["results"]
        identity = json.loads(open(os.path.join(results, "mean_results.json")).read())["run"]["identity"]
        assert identity["backbone_source"] == folder
    assert "starting over" in proc.stderr  # the second call found the first one's results

    run = tmp_path / "runs" / "liveedit-2026.01.01-00.00.00"
    os.makedirs(run / "checkpoints")
    (run / "checkpoints" / "latest").write_text("step-2")
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"model_path": folders[0], "config_path": None}}))
    assert _resumable(str(run), folders[0], None)
    assert not _resumable(str(run), folders[1], None) and not _resumable(str(run), folders[0], "other.yaml")
    os.remove(run / "checkpoints" / "latest")
    assert not _resumable(str(run), folders[0], None)  # nothing saved yet: nothing to resume
