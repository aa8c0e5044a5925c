"""The paper's tables on the toy world: Table 1 (every editor at 1, 10, 100, 1,000 sequential edits,
mean ± std over three evaluation seeds, on tiny-blip2 and tiny-llava) and Table 2 (LiveEdit's
ablations at 1,000 edits on tiny-blip2), in one resumable command.

    python run_tables.py            (or: make tables)      the full run, in the background: hours
    python run_tables.py --quick    one seed, tiny-blip2, 1 and 100 edits: about 20 minutes
    python run_tables.py --plan     list the jobs and the time estimate, run nothing

Stages (each cached: rerun the same command to resume after a stop or a failure):
1. the toy world, version 4 (2,000 eval records)      -> <data_dir>/toyworld
2. the tiny backbones pretrained on it                  -> <out_dir>/pretrained/
3. LTE's retriever stand-in, every trained editor and the ablations (seed 0, batch 8)
                                                        -> <out_dir>/runs/
4. every table cell: one editor, n edits per chunk, the records one seed draws and their order
                                                        -> <out_dir>/eval/, <out_dir>/cells/
5. <out_dir>/summary.json, docs/TABLES.md and docs/figures/tables-<backbone>.png
Logs of every job: <out_dir>/logs/<job>.log (its first line is the command).
The cells, the ledger (jobs.json) and run_info.json are kept in git, so a clone on another machine
resumes the run: only what an unfinished cell needs is rebuilt there (records/README.md).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from utils.errors import UserError  # noqa: E402


def parse_args(argv=None):
    from runs.tables.plan import ABLATIONS, FULL_TRAIN_STEPS, TABLE_EDITORS, TablesConfig

    d = TablesConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one seed, tiny-blip2, 1 and 100 edits, 200 records, short trainings and pretraining "
                        "(1,000 phase-1 steps), no ablations; "
                        "writes under records/tables-quick/ (its TABLES.md too) unless given")
    p.add_argument("--plan", action="store_true", help="print the jobs and the estimated time; run nothing")
    p.add_argument("--report_only", action="store_true", help="rewrite summary.json and the doc from finished cells")
    p.add_argument("--out_dir", default=None, help=f"the run's folder (default: {d['out_dir'].default})")
    p.add_argument("--data_dir", default=None,
                   help="where the toy world goes (default: <out_dir>/data), or the folder holding easy-edit-mm/ "
                        "and VLKEB/ for real data (default: data)")
    p.add_argument("--doc", default=None, help=f"the Markdown written (default: {d['doc_path'].default})")
    p.add_argument("--backbones", nargs="+", default=None, help="default: tiny-blip2 tiny-llava")
    p.add_argument("--editors", nargs="+", default=None, help=f"-en names (default: {' '.join(TABLE_EDITORS)})")
    p.add_argument("--points", nargs="+", type=int, default=None, help="edits per chunk (default: 1 10 100 1000)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="evaluation seeds (default: 0 1 2)")
    p.add_argument("--ablations", nargs="*", default=None, help=f"Table 2 rows (default: {' '.join(ABLATIONS)})")
    p.add_argument("--records", type=int, default=None, help="eval records per point below 1,000 edits (default: 500)")
    p.add_argument("--records_slow", type=int, default=None,
                   help="the same for editors that optimise per edit (default: 200)")
    p.add_argument("--records_max_point", type=int, default=None,
                   help="records at the largest point when it is >= 1,000 edits (default: 1000, one chunk)")
    p.add_argument("--train_steps", nargs="+", default=None, metavar="EDITOR=STEPS",
                   help=f"training steps per trained editor (default: "
                        f"{' '.join(f'{k}={v}' for k, v in FULL_TRAIN_STEPS.items())}); ALL=N sets every one")
    p.add_argument("--data", default=None, help="TOY (default) or EVQA / EIC / VLKEB under --data_dir (real backbones)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N")
    p.add_argument("--model_path", action="append", default=[], metavar="BACKBONE=FOLDER",
                   help="a backbone's local weight folder (repeatable); otherwise LIVEEDIT_*_PATH / "
                        "configs/model_paths.yaml as for the other scripts")
    p.add_argument("--jobs", type=int, default=None, help="jobs at once, one CPU thread each (default: 2)")
    p.add_argument("--no_pretrain", action="store_true", help="random tiny backbones (tests only)")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def config_from(ns):
    from runs.tables.plan import TablesConfig

    changes = {k: v for k, v in {"out_dir": ns.out_dir, "doc_path": ns.doc, "records": ns.records,
                                 "records_slow": ns.records_slow, "records_max_point": ns.records_max_point,
                                 "jobs": ns.jobs, "data_name": ns.data, "device": ns.device}.items()
               if v is not None}
    for item in ns.model_path:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--model_path: expected BACKBONE=FOLDER, got {item!r}")
        changes.setdefault("model_paths", {})[name] = folder
    for name in ("backbones", "editors", "points", "seeds", "ablations"):
        if getattr(ns, name) is not None:
            changes[name] = tuple(getattr(ns, name))
    if ns.quick:
        changes.setdefault("out_dir", os.path.join("records", "tables-quick"))
        changes.setdefault("doc_path", os.path.join(changes["out_dir"], "TABLES.md"))
    out = changes.get("out_dir", TablesConfig.__dataclass_fields__["out_dir"].default)
    toy = (ns.data or "TOY").upper() == "TOY"
    changes["data_dir"] = ns.data_dir or (os.path.join(out, "data") if toy else "data")
    if ns.no_pretrain:
        changes["pretrain"] = False
    cfg = TablesConfig.quick_defaults(**changes) if ns.quick else TablesConfig(**changes)
    for item in ns.train_steps or []:
        name, _, steps = item.partition("=")
        if not steps.isdigit() or int(steps) < 1 or (name != "ALL" and name not in cfg.train_steps):
            raise UserError(f"--train_steps: expected EDITOR=STEPS with EDITOR one of "
                            f"{', '.join(cfg.train_steps)} or ALL, got {item!r}")
        for key in (cfg.train_steps if name == "ALL" else [name]):
            cfg.train_steps[key] = int(steps)
    return cfg


def run(ns) -> int:
    from runs.tables import report
    from runs.tables.jobs import run_and_report
    from runs.tables.plan import build_jobs

    cfg = config_from(ns)
    details = {
        "seeds": list(cfg.seeds), "points": list(cfg.points),
        "records per point": f"{cfg.records} (per-edit optimisers: {cfg.records_slow}); "
                             f"{cfg.records_max_point} at {max(cfg.points)} edits" if max(cfg.points) >= 1000
        else f"{cfg.records} (per-edit optimisers: {cfg.records_slow})",
        "training steps (batch 8, seed 0)": cfg.train_steps,
        "pretraining phase-1 steps": cfg.pretrain_vision_steps or "the backbone's recipe (runs/pretrain.py)",
        "data": f"toy world, version {cfg.world_version}" if cfg.toy else cfg.data_name}
    return run_and_report(cfg, build_jobs(cfg), report, ns, details)


def main(argv=None) -> int:
    from runs.tables.jobs import runner_main

    return runner_main(run, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
