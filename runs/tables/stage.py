"""One job of `run_tables.py`, run as its own process: `python -m runs.tables.stage <kind> ...`.

    world      the toy world (version 4 by default: 2,000 eval records, so 1,000 edits can be asked)
    pretrain   one tiny backbone pretrained on it (cached by runs/pretrain.py)
    lookalike  a folder whose toy world reads the look-alike stress split as its eval split (links)
    retriever  LTE's tiny-mpnet stand-in trained on its train split (runs/aux_pretrain.py)
    train      one editor (or a LiveEdit ablation) trained on the backbone (`--seed s`: its row is `<row>-s<s>`)
    eval       one table cell: an editor at n sequential edits over the records one seed draws
               (`--file_order`: the file's first records instead; `--lifelong`: one growing repository)

Each kind is resumable and writes a small JSON marker when it has finished (`markers`); the runner
skips a job whose marker exists. A cell's JSON holds the five metrics, the edit time per edit, the
peak memory and the command that reproduces it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils.errors import UserError  # noqa: E402
from utils.io import read_json, write_json_atomic  # noqa: E402

from runs.tables.plan import backbone_marker, cell_path, folder_part, train_marker  # noqa: E402

from runs.tables.plan import LTE_RETRIEVER  # noqa: E402


def write_marker(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, obj)


def backbone_path(ns) -> str | None:
    """The backbone's weights: pretrained here, --model_path, or None (the usual resolution; a tiny
    name without either is its random weights)."""
    out = ns.records if ns.kind == "train" else ns.out
    return read_json(backbone_marker(out, ns.backbone))["folder"] if ns.pretrained else ns.model_path


# ---- the kinds -----------------------------------------------------------------------------------
def make_world(ns) -> None:
    """Generate the toy world unless one is there already (kept whatever its version, as `-dna TOY`
    keeps it) with enough eval records for the largest point."""
    from toyworld.world import ensure_toyworld, read_manifest

    folder = os.path.join(ns.data_dir, "toyworld")
    manifest = read_manifest(folder)
    if manifest is None:
        ensure_toyworld(folder, version=ns.version)
        return
    with open(os.path.join(folder, "eval.json")) as f:
        n_eval = len(json.load(f))
    if n_eval < ns.need_eval:
        raise UserError(f"the toy world in {folder} has {n_eval} eval records, the tables need {ns.need_eval}: "
                        f"point --data_dir to another folder (a version-4 world is generated there) or delete it")


def pretrain(ns) -> None:
    from runs.pretrain import config_for_world, ensure_pretrained, recipe_key

    start = time.time()
    world = os.path.join(ns.data_dir, "toyworld")
    cfg = config_for_world(ns.backbone, world, **({"vision_steps": ns.vision_steps} if ns.vision_steps else {}))
    if ns.recipe and recipe_key(cfg) != ns.recipe:
        raise UserError(f"the pretraining recipe of {ns.backbone} for the toy world in {world} is {recipe_key(cfg)}, "
                        f"the plan expected {ns.recipe}: the world there is of another version than the plan's")
    folder = ensure_pretrained(ns.backbone, world, ns.records, cfg)
    report = read_json(os.path.join(folder, "pretrain_report.json"))
    write_marker(backbone_marker(ns.records, ns.backbone),
                      {"folder": folder, "eval_accuracy": report.get("eval_accuracy"),
                       "pretrain_seconds": report.get("seconds"), "seconds_this_call": round(time.time() - start, 1)})


def lookalike(ns) -> None:
    """<out>/toyworld: links to the world in --data_dir, with `eval.json` -> its `lookalike.json`."""
    source = os.path.abspath(os.path.join(ns.data_dir, "toyworld"))
    if not os.path.isfile(os.path.join(source, "lookalike.json")):
        raise UserError(f"{source} has no lookalike.json: the look-alike split comes with toy worlds of version 4")
    target = os.path.join(ns.out, "toyworld")
    os.makedirs(target, exist_ok=True)
    links = {name: name for name in os.listdir(source) if name not in ("eval.json", "lookalike.json")}
    links["eval.json"] = "lookalike.json"
    for name, points_to in links.items():
        if not os.path.lexists(os.path.join(target, name)):
            os.symlink(os.path.join(source, points_to), os.path.join(target, name))


def retriever(ns) -> None:
    from runs.aux_pretrain import ensure_retriever

    folder = ensure_retriever(ns.data_dir, ns.records)
    write_marker(backbone_marker(ns.records, LTE_RETRIEVER), {"folder": folder})


def ablation_yaml(out: str, backbone: str, ablation: str) -> str:
    """A LiveEdit config for `backbone` with the ablation's overrides (written once, read by training)."""
    import yaml

    from editors import default_config_path
    from editors.liveedit.ablations import ablation_config, merge_overrides

    with open(default_config_path("liveedit", backbone)) as f:
        config = yaml.safe_load(f)
    merged = merge_overrides(config, ablation_config(ablation))
    path = os.path.join(out, "configs", f"liveedit-{folder_part(ablation)}-{backbone}.yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# LiveEdit on {backbone}, Table 2 row {ablation}: configs/liveedit/{backbone}.yaml + "
                f"editors.liveedit.ablation_config({ablation!r})\n")
        yaml.safe_dump(merged, f, sort_keys=False)
    return path


def trained_row(row: str, seed: int | None) -> str:
    """The row a training writes / an evaluation reads: `row`, or `row-s<seed>` for a seeded training."""
    return row if seed is None else f"{row}-s{seed}"


def train(ns) -> None:
    from runs.train_config import TrainRunConfig
    from runs.training import run_training

    row = trained_row(f"liveedit-{ns.ablation}" if ns.ablation else ns.editor, ns.seed)
    runs_dir = os.path.join(ns.records, "runs")
    prefix = folder_part(row)
    config = ablation_yaml(ns.records, ns.backbone, ns.ablation) if ns.ablation else None
    weights = backbone_path(ns)
    earlier = [run for run in sorted(glob.glob(os.path.join(runs_dir, ns.editor, ns.backbone, f"{prefix}-2*")))
               if _resumable(run, weights, config)]
    cfg = TrainRunConfig(
        editor_name=ns.editor, model_name=ns.backbone, data_name=ns.data, batch_size=ns.batch, max_steps=ns.steps,
        save_every=max(ns.steps // 4, 1), seed=0 if ns.seed is None else ns.seed, records_dir=runs_dir, name_prefix=prefix,
        model_path=weights, data_dir=ns.data_dir, device=ns.device, config_path=config, resume_from=earlier[-1] if earlier else None)
    start = time.time()
    result = run_training(cfg)
    write_marker(train_marker(ns.records, ns.backbone, row),
                      {"checkpoint": result.final_checkpoint, "run_dir": result.run_dir, "steps": ns.steps,
                       "batch": ns.batch, "config": config, "seconds_this_call": round(time.time() - start, 1)})


def _resumable(run_dir: str, model_path: str | None, config: str | None) -> bool:
    """An earlier training of this row that the stage may continue: it saved a checkpoint, on the same
    backbone weights and editor config (a changed pretraining recipe gives another backbone folder; its
    trainings are stale, not to be resumed)."""
    import yaml

    settings = os.path.join(run_dir, "config.yaml")
    if not (os.path.exists(os.path.join(run_dir, "checkpoints", "latest")) and os.path.isfile(settings)):
        return False
    with open(settings) as f:
        run = (yaml.safe_load(f) or {}).get("run", {})
    return run.get("model_path") == model_path and run.get("config_path") == config


def evaluate(ns) -> None:
    from editors import editor_class
    from runs.eval_config import EvalConfig
    from runs.eval_run import run_evaluation
    from runs.evaluation import in_owned_folder
    from runs.results import METRICS, metric_values

    cell_row = "-".join(filter(None, [trained_row(ns.row, ns.train_seed), ns.tag]))
    checkpoint = None
    if editor_class(ns.editor).needs_training:
        checkpoint = read_json(train_marker(ns.out, ns.backbone, trained_row(ns.row, ns.train_seed)))["checkpoint"]
    aux = []
    if ns.editor == "lte_vl" and ns.data.upper() == "TOY":
        aux = [f"{LTE_RETRIEVER}={read_json(backbone_marker(ns.out, LTE_RETRIEVER))['folder']}"]
    cfg = EvalConfig(
        sequential_edit_n=ns.edits, editor_name=ns.editor, model_name=ns.backbone, data_name=ns.data,
        data_sample_n=ns.records, record_seed=None if ns.file_order else ns.seed, seed=ns.seed, lifelong=ns.lifelong,
        model_path=backbone_path(ns), data_dir=ns.data_dir, device=ns.device,
        results_dir=os.path.join(ns.out, "eval"), eval_name_postfix=f"{folder_part(cell_row)}-n{ns.records}-s{ns.seed}",
        editor_checkpoint=checkpoint, aux_model_paths=aux, exact_match=False, show_progress=False,
        allow_untrained=False)
    start = time.time()
    # results of an older setting (another backbone or training) are stale; this cell's own resume
    outcome = in_owned_folder(run_evaluation, cfg, say=lambda line: print(f"note: {line}", file=sys.stderr))
    run = outcome.run
    cell = {key: metric_values(outcome.total_mean, path).get("acc") for _, key, path in METRICS[:5]}
    routing = read_json(os.path.join(outcome.folder, "mean_results.json")).get("routing")
    if ns.lifelong:  # the metrics after the last edit, and the curve of every checkpoint
        curve = read_json(os.path.join(outcome.folder, "lifelong.json"))["checkpoints"]
        cell["curve"] = [{"edits": c["edits"], **{key: metric_values(c["mean"], path).get("acc")
                                                  for _, key, path in METRICS[:5]}, "routing": c.get("routing")}
                         for c in curve]
        cell |= {key: cell["curve"][-1][key] for _, key, _ in METRICS[:5]}
        routing = cell["curve"][-1]["routing"]
    cell |= {"routing": routing, "edit_s": run.get("edit_time_per_edit_s"), "peak_mb": run.get("peak_mb"),
             "peak_kind": run.get("peak_kind"), "records": ns.records, "edits": ns.edits, "seed": ns.seed,
             "edits_made": run.get("total_edit_n"), "results": outcome.folder,
             "seconds_this_call": round(time.time() - start, 1)}
    write_marker(cell_path(ns.out, ns.backbone, cell_row, ns.edits, ns.seed), cell)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m runs.tables.stage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)
    p = kinds.add_parser("world")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--version", type=int, default=4)
    p.add_argument("--need_eval", type=int, default=1, help="eval records the plan needs")
    for kind in ("pretrain", "retriever"):
        p = kinds.add_parser(kind)
        p.add_argument("--data_dir", required=True)
        p.add_argument("--records", required=True, help="the run's output folder (caches go under it)")
        if kind == "pretrain":
            p.add_argument("--backbone", required=True)
            p.add_argument("--recipe", default=None, help="the pretraining config hash the plan expects")
            p.add_argument("--vision_steps", type=int, default=None,
                           help="phase-1 steps instead of the recipe's (run_tables.py --quick)")
    p = kinds.add_parser("train")
    for name in ("--backbone", "--editor", "--data_dir", "--records"):
        p.add_argument(name, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ablation", default=None)
    p.add_argument("--seed", type=int, default=None, help="the training seed (default 0, unsuffixed row)")
    _backbone_flags(p)
    p = kinds.add_parser("eval")
    for name in ("--backbone", "--editor", "--row", "--data_dir", "--out"):
        p.add_argument(name, required=True)
    for name in ("--edits", "--records", "--seed"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--train_seed", type=int, default=None, help="evaluate the training of this --seed")
    p.add_argument("--file_order", action="store_true", help="the first --records records in the file's order")
    p.add_argument("--lifelong", action="store_true", help="never restore: one repository over all records")
    p.add_argument("--tag", default=None, help="appended to the cell's row (two evaluations of one row and point)")
    _backbone_flags(p)
    p = kinds.add_parser("lookalike")
    p.add_argument("--data_dir", required=True, help="holds the version-4 toyworld/")
    p.add_argument("--out", required=True, help="the folder to write toyworld/ into")
    return parser.parse_args(argv)


def _backbone_flags(p) -> None:
    p.add_argument("--data", default="TOY")
    p.add_argument("--device", default="cpu")
    p.add_argument("--pretrained", action="store_true", help="the backbone pretrained by the pretrain job")
    p.add_argument("--model_path", default=None)


KINDS = {"world": make_world, "pretrain": pretrain, "lookalike": lookalike, "retriever": retriever, "train": train, "eval": evaluate}


def main(argv=None) -> int:
    ns = parse_args(argv)
    try:
        KINDS[ns.kind](ns)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
