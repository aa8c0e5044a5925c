"""LiveEdit at 1,000 sequential edits on the toy world, over several training seeds, in one resumable
command: the measurements of docs/LIFELONG.md (issue: lifelong at 1,000 edits).

    python run_lifelong.py           (or: make lifelong)   tiny-blip2, seeds 0 1 2: about 1.3 h on 2 cores
    python run_lifelong.py --plan    list the jobs and the time estimate, run nothing

Per backbone: the version-4 toy world (4,000 train / 2,000 eval records), the backbone pretrained on
it with its v4 recipe (runs/pretrain.py WORLD_OVERRIDES), LiveEdit trained once per seed, and each
training evaluated over the eval split in the file's order: -sen 1 (500 records), -sen 100 (1,000),
-sen 1000 (2,000, two chunks), --lifelong -sen 100 over all 2,000 (one repository, scored after 1, 10,
100, 1,000 and 2,000 edits) and the look-alike stress split at -sen 1000; the unedited backbone once.
Writes <out_dir>/summary.json (mean ± std over seeds, routing diagnostics, the lifelong curve), the
results section of docs/LIFELONG.md and docs/figures/lifelong-<backbone>.png. Stages are cached: the
same command resumes after a stop, also in a clone on another machine (the cells, jobs.json and
run_info.json are kept in git: records/README.md); logs of every job in <out_dir>/logs/.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")



def parse_args(argv=None):
    from runs.lifelong.plan import LifelongConfig

    d = LifelongConfig.__dataclass_fields__
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="print the jobs and the estimated time; run nothing")
    p.add_argument("--report_only", action="store_true", help="rewrite summary.json and the doc from finished cells")
    p.add_argument("--out_dir", default=d["out_dir"].default, help="the run's folder (default: %(default)s)")
    p.add_argument("--data_dir", default=None, help="where the version-4 toy world goes (default: <out_dir>/data)")
    p.add_argument("--doc", default=d["doc_path"].default,
                   help="the Markdown whose results section is rewritten (default: %(default)s)")
    p.add_argument("--backbones", nargs="+", default=list(d["backbones"].default),
                   help="tiny backbones (default: %(default)s; also tiny-llava, tiny-minigpt4)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default: %(default)s)")
    p.add_argument("--train_steps", type=int, default=d["train_steps"].default,
                   help="LiveEdit training steps at batch 8 (default: %(default)s)")
    p.add_argument("--max_records", type=int, default=None,
                   help="cap every evaluation's records and edits per chunk (quick looks, tests)")
    p.add_argument("--jobs", type=int, default=d["jobs"].default, help="jobs at once, one CPU thread each (default: 2)")
    p.add_argument("--no_pretrain", action="store_true", help="random tiny backbones (tests only)")
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def config_from(ns):
    from runs.lifelong.plan import LifelongConfig

    return LifelongConfig(out_dir=ns.out_dir, data_dir=ns.data_dir or os.path.join(ns.out_dir, "data"),
                          doc_path=ns.doc, backbones=tuple(ns.backbones), seeds=tuple(ns.seeds),
                          train_steps=ns.train_steps, max_records=ns.max_records, pretrain=not ns.no_pretrain,
                          jobs=ns.jobs)


def run(ns) -> int:
    from runs.lifelong import report
    from runs.lifelong.plan import build_jobs
    from runs.tables.jobs import run_and_report

    cfg = config_from(ns)
    details = {"training seeds requested": list(cfg.seeds),
               "training": f"{cfg.train_steps} steps at batch {cfg.train_batch}, configs/liveedit/<backbone>.yaml",
               "data": "toy world, version 4" + (f", evaluations capped at {cfg.max_records} records"
                                                 if cfg.max_records else "")}
    return run_and_report(cfg, build_jobs(cfg), report, ns, details)


def main(argv=None) -> int:
    from runs.tables.jobs import runner_main

    return runner_main(run, parse_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
