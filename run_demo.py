"""The embedded default: the whole LiveEdit job on the toy world, on a CPU, in minutes.

    python run_demo.py            (or: make demo)

Stages, each skipped when its output exists (delete records/demo to start over):
1. generate the toy world                       -> data/toyworld/
2. pretrain tiny-blip2 on it                    -> records/pretrained/tiny-blip2-<key>/
3. train the LiveEdit editor                    -> records/demo/liveedit/tiny-blip2/<run>/
4. evaluate: unedited, LiveEdit at 1 / 10 / 100 sequential edits, FT-L at 100
                                                -> eval_results/demo/<editor>/tiny-blip2/TOY-demo/...
5. write records/demo/summary.json, records/demo/demo_metrics.png and print a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils.errors import UserError  # noqa: E402
from utils.io import write_json_atomic  # noqa: E402

MODEL = "tiny-blip2"
DEMO_DIR = os.path.join("records", "demo")
RESULTS_DIR = os.path.join("eval_results", "demo")
TABLE_METRICS = 5  # Rel, T-Gen, M-Gen, T-Loc, M-Loc: the first five of runs.results.METRICS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_steps", type=int, default=6000, help="LiveEdit training steps (default 6000)")
    p.add_argument("--batch_size", type=int, default=8, help="LiveEdit training batch size (default 8)")
    p.add_argument("--eval_records", type=int, default=200, help="toy eval records to edit (default 200)")
    p.add_argument("--data_dir", default="data", help="where the toy world goes (default data/)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_liveedit(args, backbone_dir: str) -> str:
    """Final checkpoint of the demo's LiveEdit training (trained once, then reused)."""
    from runs.training import TrainRunConfig, run_training

    pointer = os.path.join(DEMO_DIR, "liveedit_checkpoint.json")
    wanted = {"train_steps": args.train_steps, "batch_size": args.batch_size, "seed": args.seed,
              "backbone": backbone_dir}
    if os.path.isfile(pointer):
        with open(pointer) as f:
            saved = json.load(f)
        if all(saved.get(k) == v for k, v in wanted.items()) and os.path.isdir(saved["checkpoint"]):
            print(f"[3/5] LiveEdit already trained: {saved['checkpoint']}")
            return saved["checkpoint"]
    print(f"[3/5] training LiveEdit on {MODEL} for {args.train_steps} steps")
    result = run_training(TrainRunConfig(
        editor_name="liveedit", model_name=MODEL, data_name="TOY", batch_size=args.batch_size,
        max_steps=args.train_steps, save_every=max(args.train_steps // 4, 1), seed=args.seed,
        records_dir=DEMO_DIR, name_prefix="demo", model_path=backbone_dir, data_dir=args.data_dir))
    write_json_atomic(pointer, {"checkpoint": result.final_checkpoint, **wanted}, indent=None)
    return result.final_checkpoint


def inputs_changed(path: str, inputs: dict) -> bool:
    """Whether the demo's evaluations last ran to the end on other inputs than `inputs`, or never did.

    The evaluation refuses to resume results made with another backbone folder (after a toy world
    upgrade re-pretrained it), checkpoint or set of records (`--eval_records`, `--train_steps`);
    the demo owns its results folder, so it starts those evaluations over instead.
    """
    if not os.path.isfile(path):
        return True
    with open(path) as f:
        return json.load(f) != inputs


def evaluate(vllm, editor_name: str, edits: int, records, checkpoint=None, overwrite=False) -> dict:
    """Mean metrics of one sequential evaluation (resumed or reused when on disk, unless `overwrite`).

    The demo owns its results folder: results of another configuration there (an upgrade changed
    what the run identity holds) are started over instead of refused.
    """
    from editors import load_editor
    from runs.evaluation import EvalConfig, evaluate as run_eval, in_owned_folder
    from runs.results import METRICS, metric_values

    editor = load_editor(editor_name, vllm, checkpoint=checkpoint)
    cfg = EvalConfig(sequential_edit_n=edits, data_name="TOY", eval_name_postfix="demo", results_dir=RESULTS_DIR,
                     batch_size=32, exact_match=False, editor_checkpoint=checkpoint, show_progress=True,
                     overwrite=overwrite)
    try:
        outcome = in_owned_folder(lambda c: run_eval(editor, records, c), cfg, say=lambda line: print("      " + line))
    finally:
        editor.remove()
    return {key: round(metric_values(outcome.total_mean, path)["acc"], 4) for _, key, path in METRICS[:TABLE_METRICS]}


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runs.results import METRICS

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = [1, 10, 100]
    metrics = METRICS[:TABLE_METRICS]
    for label, key, _ in metrics:
        ax.plot(xs, [summary["liveedit"][str(x)][key] for x in xs], marker="o", label=f"LiveEdit {label}")
    ax.scatter([100] * len(metrics), [summary["ft_l"]["100"][key] for _, key, _ in metrics], marker="x",
               color="black", label="FT-L @100")
    ax.set_xscale("log")
    ax.set_xlabel("sequential edits per chunk")
    ax.set_ylabel("teacher-forced token accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"toy world, {MODEL}")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict) -> str:
    from runs.results import METRICS

    keys = [key for _, key, _ in METRICS[:TABLE_METRICS]]
    rows = [("unedited", "-", summary["unedited"])]
    rows += [("LiveEdit", n, summary["liveedit"][n]) for n in ("1", "10", "100")]
    rows += [("FT-L", "100", summary["ft_l"]["100"])]
    lines = ["| editor | edits | Rel | T-Gen | M-Gen | T-Loc | M-Loc |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {n} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |" for name, n, m in rows]
    return "\n".join(lines)


def run(args) -> dict:
    from editors.vllms import load_vllm
    from runs.data import load_split
    from runs.pretrain import ensure_pretrained
    from toyworld import ensure_toy_data

    start = time.time()
    os.makedirs(DEMO_DIR, exist_ok=True)
    print("[1/5] toy world")
    world = ensure_toy_data(args.data_dir)
    print(f"[2/5] pretrained {MODEL} (trained once, then reused)")
    backbone_dir = ensure_pretrained(MODEL, world)
    with open(os.path.join(backbone_dir, "pretrain_report.json")) as f:
        print("      unedited accuracy on held-out toy questions:", json.load(f)["eval_accuracy"])
    checkpoint = train_liveedit(args, backbone_dir)
    print("[4/5] evaluating")
    vllm = load_vllm(MODEL, path=backbone_dir)
    _, records = load_split("TOY", "eval", args.data_dir, args.eval_records)
    inputs = {"backbone": backbone_dir, "checkpoint": checkpoint, "eval_records": args.eval_records,
              "data_dir": args.data_dir}
    inputs_path = os.path.join(DEMO_DIR, "eval_inputs.json")
    fresh = inputs_changed(inputs_path, inputs)
    summary = {"unedited": evaluate(vllm, "none", 100, records, overwrite=fresh),
               "liveedit": {str(n): evaluate(vllm, "liveedit", n, records, checkpoint, overwrite=fresh)
                            for n in (1, 10, 100)},
               "ft_l": {"100": evaluate(vllm, "ft_l", 100, records, overwrite=fresh)}}
    write_json_atomic(inputs_path, inputs, indent=None)  # only once every evaluation has finished
    summary["seconds"] = round(time.time() - start, 1)
    write_json_atomic(os.path.join(DEMO_DIR, "summary.json"), summary, indent=2)
    plot(summary, os.path.join(DEMO_DIR, "demo_metrics.png"))
    print("[5/5] done in", summary["seconds"], "s\n")
    print(table(summary))
    print(f"\nwritten: {DEMO_DIR}/summary.json, {DEMO_DIR}/demo_metrics.png, {RESULTS_DIR}/; "
          f"TensorBoard: tensorboard --logdir records/demo")
    return summary


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
