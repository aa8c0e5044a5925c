"""What `run_tables.py` runs: the settings of the two tables and the list of jobs they need.

Table 1: every editor on every backbone at 1, 10, 100 and 1,000 sequential edits, three evaluation
seeds (each seed draws which eval records are edited and in what order, `--record_seed`), one
trained editor per method and backbone. Table 2: LiveEdit's ablations at 1,000 edits on the first
backbone. Every job is one command of the project (`train_vllm_editor.py`, `test_vllm_edit.py`,
`python -m runs.tables.stage ...`), so each table cell can be rerun by hand from its log.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

from editors.liveedit.ablations import ablation_names
from utils.errors import UserError
from utils.names import safe_name_part

# The -en names of Table 1's rows, in the paper's order (LiveEdit last, as the paper prints it).
TABLE_EDITORS = ("ft_l", "ft_m", "mend_vl", "serac_vl", "tp_vl", "lte_vl", "recipe_vl", "lemoe_vl", "grace",
                 "wise", "liveedit")
# Editors that optimise per edit (tens of gradient steps for every edit): slow on a CPU, so the
# table may give them fewer records per point (`TablesConfig.records_slow`).
PER_EDIT_OPTIMISERS = ("ft_l", "ft_m", "tp_vl", "lemoe_vl", "grace", "wise")
# Table 2's rows (besides LiveEdit itself): the paper's names (editors/liveedit/ablations.py).
ABLATIONS = tuple(ablation_names())
UNEDITED = "none"

# Training steps per trained editor (batch 8, seed 0): the recipes docs/BASELINES.md and docs/DEMO.md
# measured on the toy world; --quick scales them down.
FULL_TRAIN_STEPS = {"liveedit": 6000, "mend_vl": 500, "serac_vl": 1000, "recipe_vl": 600, "lte_vl": 600}
QUICK_TRAIN_STEPS = {"liveedit": 1500, "mend_vl": 200, "serac_vl": 300, "recipe_vl": 200, "lte_vl": 200}
QUICK_VISION_STEPS = 1000  # --quick's phase-1 pretraining steps (runs/pretrain.py PretrainConfig's default)


LTE_RETRIEVER = "tiny-mpnet"


# ---- where each job's outputs go: its marker (the runner skips a job whose marker exists) --------
def backbone_marker(out: str, backbone: str) -> str:
    return os.path.join(out, "backbones", f"{backbone}.json")


def train_marker(out: str, backbone: str, row: str) -> str:
    return os.path.join(out, "trained", backbone, f"{folder_part(row)}.json")


def cell_path(out: str, backbone: str, row: str, point: int, seed: int) -> str:
    return os.path.join(out, "cells", backbone, folder_part(row), f"{point}-s{seed}.json")


def world_marker(data_dir: str) -> str:
    return os.path.join(data_dir, "toyworld", "manifest.json")


def ablation_key(name: str) -> str:
    """The summary key of an ablation row: `liveedit-l_sr1`, ..., `liveedit-HR*`."""
    return f"liveedit-{name}"


def folder_part(name: str) -> str:
    """A name as a folder / file-name part (`HR*` -> `HRstar`)."""
    return name.replace("*", "star")


@dataclass
class TablesConfig:
    """The run's settings: `run_tables.py`'s flags (see its --help), defaults = the full run."""

    out_dir: str = os.path.join("records", "tables")
    data_dir: str = os.path.join("records", "tables", "data")
    doc_path: str = os.path.join("docs", "TABLES.md")
    backbones: tuple[str, ...] = ("tiny-blip2", "tiny-llava")
    editors: tuple[str, ...] = TABLE_EDITORS
    points: tuple[int, ...] = (1, 10, 100, 1000)
    seeds: tuple[int, ...] = (0, 1, 2)
    ablations: tuple[str, ...] = ABLATIONS
    records: int = 500
    """Eval records per point below 1,000 edits (each seed draws its own)."""
    records_slow: int = 200
    """The same for editors that optimise per edit (`PER_EDIT_OPTIMISERS`)."""
    records_max_point: int = 1000
    """Records at the largest point: one chunk of 1,000 at 1,000 edits."""
    train_steps: dict[str, int] = field(default_factory=lambda: dict(FULL_TRAIN_STEPS))
    train_batch: int = 8
    world_version: int = 4
    pretrain: bool = True
    """Pretrain the tiny backbones on the toy world (False: their random weights; tests only)."""
    pretrain_vision_steps: int | None = None
    """Phase-1 (vision) pretraining steps instead of the backbone's recipe (None: the recipe's;
    --quick: 1,000, the default recipe's, since the v4 recipe's 6,000 alone take about 27 minutes)."""
    data_name: str = "TOY"
    """The data set (-dna / -dn): TOY, or EVQA / EIC / VLKEB under data_dir for the real backbones."""
    device: str = "cpu"
    model_paths: dict[str, str] = field(default_factory=dict)
    """backbone -> its local weight folder (otherwise the usual resolution: env, configs/model_paths.yaml)."""
    jobs: int = 2
    quick: bool = False

    def __post_init__(self) -> None:
        from editors import editor_class
        from utils.data import canonical_dataset_name

        self.data_name = canonical_dataset_name(self.data_name)  # an unknown name is a UserError

        for name in self.editors:
            editor_class(name)  # an unknown name is a UserError naming it
        for name in self.ablations:
            if name not in ABLATIONS:
                raise UserError(f"--ablations: unknown ablation {name!r}; the paper's are {', '.join(ABLATIONS)}")
        if not self.points or min(self.points) < 1:
            raise UserError("--points must be one or more positive numbers of edits")
        if min(self.records, self.records_slow, self.records_max_point) < 1 or self.jobs < 1:
            raise UserError("--records, --records_slow, --records_max_point and --jobs must be at least 1")
        for point in self.points:
            if self.records_for("liveedit", point) < point or self.records_for("ft_l", point) < point:
                raise UserError(f"fewer records than edits at {point} edits: raise --records / --records_slow / "
                                f"--records_max_point (a chunk needs as many records as edits)")

    @classmethod
    def quick_defaults(cls, **changes) -> "TablesConfig":
        """--quick: one seed, the first backbone, 1 and 100 edits, no ablations, short trainings."""
        base = dict(backbones=("tiny-blip2",), points=(1, 100), seeds=(0,), ablations=(), records=200,
                    records_slow=200, train_steps=dict(QUICK_TRAIN_STEPS), pretrain_vision_steps=QUICK_VISION_STEPS,
                    quick=True)
        return cls(**(base | changes))

    def records_for(self, editor: str, point: int) -> int:
        if point == max(self.points) and point >= 1000:
            return self.records_max_point
        return self.records_slow if editor in PER_EDIT_OPTIMISERS else self.records

    @property
    def toy(self) -> bool:
        return self.data_name.upper() == "TOY"

    def pretrained(self, backbone: str) -> bool:
        """Whether the backbone is a tiny one pretrained here on the toy world."""
        return self.toy and self.pretrain and backbone.startswith("tiny-") and backbone not in self.model_paths


@dataclass
class Job:
    """One command of the run: its name (also its log's name), argv, what it waits for, a cost guess."""

    name: str
    argv: list[str]
    marker: str
    deps: tuple[str, ...] = ()
    cost_s: float = 60.0
    kind: str = ""
    meta: dict = field(default_factory=dict)


# Rough seconds per training step and per edit (2-core CPU, one thread): only for the ETA and the
# scheduling order, never for a result.
STEP_S = {"liveedit": 0.12, "mend_vl": 0.2, "serac_vl": 0.5, "recipe_vl": 0.3, "lte_vl": 0.5}
EDIT_S = {"ft_l": 0.3, "ft_m": 0.3, "tp_vl": 0.5, "lemoe_vl": 0.1, "grace": 1.5, "wise": 0.8}


def max_records(cfg: TablesConfig) -> int:
    return max(cfg.records_for(editor, point) for editor in ("liveedit", "ft_l") for point in cfg.points)


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def trained_editors(cfg: TablesConfig) -> list[str]:
    from editors import editor_class

    return [name for name in cfg.editors if editor_class(name).needs_training]


def train_key(backbone: str, editor: str) -> str:
    return f"train-{backbone}-{folder_part(editor)}"


def eval_key(backbone: str, row: str, point: int, seed: int) -> str:
    return f"eval-{backbone}-{folder_part(row)}-{point}-s{seed}"


def build_jobs(cfg: TablesConfig) -> list[Job]:
    """Every job of the run in a valid order (dependencies first); `jobs.run_jobs` skips finished ones."""
    jobs = [] if not cfg.toy else [Job("world", _python("-m", "runs.tables.stage", "world", "--data_dir", cfg.data_dir,
                                 "--version", str(cfg.world_version),
                                 "--need_eval", str(max_records(cfg))),
                world_marker(cfg.data_dir), cost_s=60, kind="world")]
    for backbone in cfg.backbones:
        if cfg.pretrained(backbone):
            steps = cfg.pretrain_vision_steps
            jobs.append(Job(f"pretrain-{backbone}", _python("-m", "runs.tables.stage", "pretrain", "--backbone", backbone,
                                                            "--data_dir", cfg.data_dir, "--records", cfg.out_dir,
                                                            "--recipe", pretrain_recipe(backbone, cfg.world_version, steps),
                                                            *(["--vision_steps", str(steps)] if steps else [])),
                            backbone_marker(cfg.out_dir, backbone), deps=("world",), kind="pretrain", meta={"backbone": backbone},
                            cost_s=pretrain_cost_s(backbone, cfg.world_version, steps)))
    if "lte_vl" in cfg.editors and cfg.toy:
        jobs.append(Job("retriever", _python("-m", "runs.tables.stage", "retriever", "--data_dir", cfg.data_dir,
                                             "--records", cfg.out_dir),
                        backbone_marker(cfg.out_dir, LTE_RETRIEVER), deps=("world",), cost_s=60, kind="retriever"))
    rows = [(backbone, editor, None) for backbone in cfg.backbones for editor in trained_editors(cfg)]
    rows += [(cfg.backbones[0], "liveedit", ablation) for ablation in cfg.ablations]
    for backbone, editor, ablation in rows:
        row = ablation_key(ablation) if ablation else editor
        steps = cfg.train_steps[editor]
        argv = ["--backbone", backbone, "--editor", editor, "--steps", str(steps), "--batch", str(cfg.train_batch),
                "--data_dir", cfg.data_dir, "--records", cfg.out_dir] + (["--ablation", ablation] if ablation else [])
        argv += _backbone_args(cfg, backbone)
        deps = tuple(_backbone_deps(cfg, backbone))
        jobs.append(Job(train_key(backbone, row), _python("-m", "runs.tables.stage", "train", *argv),
                        train_marker(cfg.out_dir, backbone, row), deps=deps,
                        cost_s=steps * STEP_S.get(editor, 0.3) + 20, kind="train",
                        meta={"backbone": backbone, "editor": editor, "row": row}))
    for backbone in cfg.backbones:
        table_rows = [(UNEDITED, None)] + [(editor, None) for editor in cfg.editors]
        if backbone == cfg.backbones[0]:
            table_rows += [("liveedit", ablation) for ablation in cfg.ablations]
        for editor, ablation in table_rows:
            row = ablation_key(ablation) if ablation else editor
            points = [max(cfg.points)] if ablation else ([1] if editor == UNEDITED else list(cfg.points))
            for point in points:
                for seed in cfg.seeds:
                    jobs.append(_eval_job(cfg, backbone, editor, row, point, seed))
    return jobs


def _pretrain_config(backbone: str, world_version: int, vision_steps: int | None):
    """The backbone's pretraining config for this world version, with `vision_steps` phase-1 steps when given."""
    from runs.pretrain import config_for

    return config_for(backbone, world_version, **({"vision_steps": vision_steps} if vision_steps else {}))


def pretrain_recipe(backbone: str, world_version: int, vision_steps: int | None = None) -> str:
    """That pretraining config's hash (`runs.pretrain.recipe_key`)."""
    from runs.pretrain import recipe_key

    return recipe_key(_pretrain_config(backbone, world_version, vision_steps))


def pretrain_cost_s(backbone: str, world_version: int, vision_steps: int | None = None) -> float:
    """Rough CPU seconds of that pretraining on one core: tiny-blip2's v4 tower, measured at ~0.12 s per
    phase-1 step and ~0.45 s per phase-2 step (docs/LIFELONG.md section 11); narrower towers are faster."""
    cfg = _pretrain_config(backbone, world_version, vision_steps)
    return 0.12 * cfg.vision_steps + 0.45 * cfg.steps


def _backbone_args(cfg: TablesConfig, backbone: str) -> list[str]:
    """Where a train / eval job finds its data, device and backbone weights."""
    args = ["--data", cfg.data_name, "--device", cfg.device]
    if cfg.pretrained(backbone):
        args.append("--pretrained")
    elif backbone in cfg.model_paths:
        args += ["--model_path", cfg.model_paths[backbone]]
    return args


def _backbone_deps(cfg: TablesConfig, backbone: str) -> list[str]:
    return (["world"] if cfg.toy else []) + ([f"pretrain-{backbone}"] if cfg.pretrained(backbone) else [])


def _eval_job(cfg: TablesConfig, backbone: str, editor: str, row: str, point: int, seed: int) -> Job:
    from editors import editor_class

    n = cfg.records_for(editor, point)
    argv = ["--backbone", backbone, "--editor", editor, "--row", row, "--edits", str(point), "--records", str(n),
            "--seed", str(seed), "--data_dir", cfg.data_dir, "--out", cfg.out_dir]
    argv += _backbone_args(cfg, backbone)
    deps = _backbone_deps(cfg, backbone)
    if editor_class(editor).needs_training:
        deps.append(train_key(backbone, row))
    if editor == "lte_vl" and cfg.toy:
        deps.append("retriever")
    cost = n * EDIT_S.get(editor, 0.03) + n * 0.03 + 15
    return Job(eval_key(backbone, row, point, seed), _python("-m", "runs.tables.stage", "eval", *argv),
               cell_path(cfg.out_dir, backbone, row, point, seed), deps=tuple(deps), cost_s=cost, kind="eval",
               meta={"backbone": backbone, "editor": editor, "row": row, "point": point, "seed": seed, "records": n})


def check_names(cfg: TablesConfig) -> None:
    for backbone in cfg.backbones:
        safe_name_part(backbone, "--backbones")


def describe(cfg: TablesConfig) -> dict:
    """The settings as written into summary.json and TABLES.md."""
    return dataclasses.asdict(cfg)
