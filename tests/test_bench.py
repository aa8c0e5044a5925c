"""bench/bench_editing.py: a reduced (--smoke) run prints every figure as one valid JSON line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {"setup", "edit_latency", "edits_per_s", "batched_edit_speedup", "routed_inference",
            "eval_records_per_s", "eval_batched_speedup", "repository_growth", "wall_time"}


def test_bench_editing_smoke_prints_every_figure(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_editing.py"), "--shapes", "tiny",
                           "--smoke", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    lines = [json.loads(ln) for ln in printed]  # every printed line is valid JSON
    assert {ln["what"] for ln in lines} == EXPECTED
    assert [json.loads(ln) for ln in out.read_text().splitlines()] == lines  # --out holds the same lines

    by_what: dict[str, list[dict]] = {}
    for ln in lines:
        by_what.setdefault(ln["what"], []).append(ln)
    assert {ln["batch_size"] for ln in by_what["edits_per_s"]} == {1, 4}
    assert {ln["batch_size"] for ln in by_what["eval_records_per_s"]} == {1, 4}
    routed = by_what["routed_inference"]
    assert {(ln["experts"], ln["batch_size"], ln["variant"]) for ln in routed} == {
        (0, 1, "routed"), (0, 4, "routed"), (100, 1, "routed"), (100, 4, "routed"),
        (100, 1, "all_selected"), (100, 4, "all_selected")}
    for ln in routed:  # forcing selects every expert for every row; CPU memory is null, not a number
        if ln["variant"] == "all_selected":
            assert ln["selected_mean"] == ln["experts"] and ln["rows_routed"] == ln["image_rows"]
        assert ln["peak_bytes"] is None
    for what in ("edit_latency", "batched_edit_speedup", "eval_batched_speedup", "repository_growth"):
        (ln,) = by_what[what]
        assert isinstance(ln["pass"], bool) and isinstance(ln["target_applies"], bool) and ln["target"]
    assert by_what["eval_batched_speedup"][0]["same_numbers"] is True
