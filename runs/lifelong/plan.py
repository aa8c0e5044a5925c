"""What `run_lifelong.py` runs: LiveEdit's lifelong measurements (docs/LIFELONG.md) as one resumable job list.

Per backbone: the version-4 toy world, the backbone pretrained on it (its v4 recipe), LiveEdit trained
once per seed (batch 8, the same steps), and every training evaluated the same way over the eval split
in the file's order, so the seeds differ only by their training:

    1          -sen 1 over the first 500 records
    100        -sen 100 over the first 1,000 (10 chunks)
    1000       -sen 1000 over 2,000 (2 chunks)
    lifelong   --lifelong -sen 100 over 2,000: one repository, scored after 1, 10, 100, 1,000 and 2,000 edits
    lookalike  -sen 1000 over the look-alike stress split (each probe one attribute away; no target)

plus the unedited backbone at -sen 1000. Every evaluation keeps LiveEdit's routing diagnostics. The jobs
are `python -m runs.tables.stage` commands run by `runs.tables.jobs.run_jobs` (ledger, logs, resume).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from utils.errors import UserError
from utils.names import safe_name_part

from runs.tables.plan import (UNEDITED, Job, _python, backbone_marker, cell_path, pretrain_cost_s, pretrain_recipe,
                              train_marker, world_marker)

EDITOR = "liveedit"


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of every training: its summary key, -sen, how many records (file order), its kind."""

    name: str
    edits: int
    records: int
    lifelong: bool = False
    lookalike: bool = False


EVALUATIONS = (Evaluation("1", 1, 500), Evaluation("100", 100, 1000), Evaluation("1000", 1000, 2000),
               Evaluation("lifelong", 100, 2000, lifelong=True), Evaluation("lookalike", 1000, 2000, lookalike=True))
UNEDITED_EVALUATION = Evaluation("1000", 1000, 2000)

# Rough seconds (2-core CPU, one thread per job): only for the ETA, never for a result.
TRAIN_STEP_S, EVAL_RECORD_S = 0.12, 0.05


@dataclass
class LifelongConfig:
    """`run_lifelong.py`'s flags (see its --help); the defaults are the full run."""

    out_dir: str = os.path.join("records", "lifelong")
    data_dir: str = os.path.join("records", "lifelong", "data")
    doc_path: str = os.path.join("docs", "LIFELONG.md")
    backbones: tuple[str, ...] = ("tiny-blip2",)
    seeds: tuple[int, ...] = (0, 1, 2)
    train_steps: int = 6000
    train_batch: int = 8
    max_records: int | None = None
    """Caps every evaluation's records and edits per chunk (tests and quick looks; None: the full protocol)."""
    pretrain: bool = True
    """Pretrain the tiny backbones on the toy world (False: their random weights; tests only)."""
    jobs: int = 2

    def __post_init__(self) -> None:
        for backbone in self.backbones:
            safe_name_part(backbone, "--backbones")
            if not backbone.startswith("tiny-"):
                raise UserError(f"--backbones: {backbone!r} is not a tiny backbone; run_lifelong.py measures the toy "
                                f"world (real backbones: test_vllm_edit.py --lifelong on EVQA / EIC / VLKEB)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError("--seeds: give one or more distinct training seeds")
        if self.train_steps < 1 or self.jobs < 1 or (self.max_records is not None and self.max_records < 1):
            raise UserError("--train_steps, --jobs and --max_records must be at least 1")

    def evaluations(self) -> list[Evaluation]:
        """The protocol's evaluations, capped by `max_records` (one of each distinct evaluation left)."""
        kept: dict[tuple, Evaluation] = {}
        for e in map(self.capped, EVALUATIONS):
            kept.setdefault((e.edits, e.records, tag_of(e)), e)
        return list(kept.values())

    def capped(self, e: Evaluation) -> Evaluation:
        if self.max_records is None:
            return e
        return dataclasses.replace(e, edits=min(e.edits, self.max_records), records=min(e.records, self.max_records))

    def need_eval(self) -> int:
        return max(e.records for e in self.evaluations())


def stage(*args: str) -> list[str]:
    return _python("-m", "runs.tables.stage", *args)


def lookalike_dir(cfg: LifelongConfig) -> str:
    return os.path.join(cfg.out_dir, "lookalike")


def tag_of(evaluation: Evaluation) -> str | None:
    return "lifelong" if evaluation.lifelong else "lookalike" if evaluation.lookalike else None


def cell_row(evaluation: Evaluation, seed: int | None) -> str:
    """The cell's row: `liveedit-s<seed>[-lifelong|-lookalike]`, or `none` for the unedited backbone."""
    return UNEDITED if seed is None else "-".join(filter(None, [f"{EDITOR}-s{seed}", tag_of(evaluation)]))


def eval_cell(cfg: LifelongConfig, backbone: str, evaluation: Evaluation, seed: int | None) -> str:
    return cell_path(cfg.out_dir, backbone, cell_row(evaluation, seed), evaluation.edits, 0)


def build_jobs(cfg: LifelongConfig) -> list[Job]:
    """Every job in a valid order (dependencies first); `runs.tables.jobs.run_jobs` skips finished ones."""
    jobs = [Job("world", stage("world", "--data_dir", cfg.data_dir, "--version", "4", "--need_eval", str(cfg.need_eval())),
                world_marker(cfg.data_dir), cost_s=60, kind="world"),
            Job("lookalike", stage("lookalike", "--data_dir", cfg.data_dir, "--out", lookalike_dir(cfg)),
                os.path.join(lookalike_dir(cfg), "toyworld", "eval.json"), deps=("world",), cost_s=1, kind="world")]
    for backbone in cfg.backbones:
        weights = ["--pretrained"] if cfg.pretrain else []
        deps = ("world",)
        if cfg.pretrain:
            jobs.append(Job(f"pretrain-{backbone}", stage("pretrain", "--backbone", backbone, "--data_dir", cfg.data_dir,
                                                          "--records", cfg.out_dir, "--recipe", pretrain_recipe(backbone, 4)),
                            backbone_marker(cfg.out_dir, backbone), deps=deps, cost_s=pretrain_cost_s(backbone, 4), kind="pretrain"))
            deps = ("world", f"pretrain-{backbone}")
        jobs.append(_eval_job(cfg, backbone, cfg.capped(UNEDITED_EVALUATION), None, weights, deps))
        for seed in cfg.seeds:
            train = f"train-{backbone}-s{seed}"
            jobs.append(Job(train, stage("train", "--backbone", backbone, "--editor", EDITOR, "--steps", str(cfg.train_steps),
                                         "--batch", str(cfg.train_batch), "--seed", str(seed), "--data_dir", cfg.data_dir,
                                         "--records", cfg.out_dir, *weights),
                            train_marker(cfg.out_dir, backbone, f"{EDITOR}-s{seed}"), deps=deps,
                            cost_s=cfg.train_steps * TRAIN_STEP_S + 20, kind="train"))
            for evaluation in cfg.evaluations():
                extra = ("lookalike",) if evaluation.lookalike else ()
                jobs.append(_eval_job(cfg, backbone, evaluation, seed, weights, deps + (train,) + extra))
    return jobs


def _eval_job(cfg: LifelongConfig, backbone: str, evaluation: Evaluation, seed: int | None, weights: list[str],
              deps: tuple[str, ...]) -> Job:
    editor = UNEDITED if seed is None else EDITOR
    data_dir = lookalike_dir(cfg) if evaluation.lookalike else cfg.data_dir
    argv = ["--backbone", backbone, "--editor", editor, "--row", editor, "--edits", str(evaluation.edits),
            "--records", str(evaluation.records), "--seed", "0", "--file_order", "--data_dir", data_dir,
            "--out", cfg.out_dir, *weights]
    if seed is not None:
        argv += ["--train_seed", str(seed)] + (["--tag", tag_of(evaluation)] if tag_of(evaluation) else [])
        argv += ["--lifelong"] if evaluation.lifelong else []
    name = f"eval-{backbone}-{UNEDITED if seed is None else f'{EDITOR}-s{seed}'}-{evaluation.name}"
    return Job(name, stage("eval", *argv), eval_cell(cfg, backbone, evaluation, seed), deps=deps,
               cost_s=evaluation.records * EVAL_RECORD_S + 15, kind="eval")
