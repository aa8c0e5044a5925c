"""From the finished cells to `summary.json`, `docs/TABLES.md` and its figures.

A cell is one evaluation (backbone, row, edits, seed). A table entry is the mean over the seeds
of each metric, with the sample standard deviation (ddof 1; 0 for a single seed). Avg is the mean
of the five metrics per seed, then averaged the same way, as the paper's Avg.
"""
from __future__ import annotations

import os
import statistics

from utils.io import read_json, write_json_atomic, write_text_atomic

from runs.tables import paper
from runs.tables.plan import ABLATIONS, UNEDITED, TablesConfig, ablation_key, cell_path

METRIC_KEYS = ("rel", "t_gen", "m_gen", "t_loc", "m_loc")
LABELS = ("Rel", "T-Gen", "M-Gen", "T-Loc", "M-Loc")
NAMES = {"ft_l": "FT-L", "ft_m": "FT-M", "mend_vl": "MEND", "serac_vl": "SERAC", "tp_vl": "TP", "lte_vl": "LTE",
         "recipe_vl": "RECIPE", "lemoe_vl": "LEMoE", "grace": "GRACE", "wise": "WISE", "liveedit": "LiveEdit",
         UNEDITED: "unedited", **{ablation_key(a): f"LiveEdit − {a}" if a != "HR*" else "LiveEdit HR*"
                                  for a in ABLATIONS}}
ANALYSIS_START, ANALYSIS_END = "<!-- analysis:start -->", "<!-- analysis:end -->"


def metrics_mean_std(cells: list[dict]) -> dict:
    """The five metrics and Avg (the mean of the five per cell), each the mean over cells, and their
    sample std over cells under "std" (0 for a single cell)."""
    per_seed = {key: [c[key] for c in cells] for key in METRIC_KEYS}
    per_seed["avg"] = [statistics.fmean(c[key] for key in METRIC_KEYS) for c in cells]
    spread = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
    entry = {key: round(statistics.fmean(xs), 4) for key, xs in per_seed.items()}
    entry["std"] = {key: round(spread(xs), 4) for key, xs in per_seed.items()}
    return entry


def _entry(cells: list[dict]) -> dict:
    """Mean ± std over seeds of one (backbone, row, edits)."""
    entry = metrics_mean_std(cells)
    edit_times = [c["edit_s"] for c in cells if c.get("edit_s") is not None]
    entry["edit_s"] = round(statistics.fmean(edit_times), 5) if edit_times else None
    entry["peak_mb"] = round(max(c["peak_mb"] for c in cells), 1)
    entry["records"] = cells[0]["records"]
    entry["seeds"] = [c["seed"] for c in cells]
    return entry


def rows_of(cfg: TablesConfig, backbone: str) -> list[tuple[str, list[int]]]:
    """(row key, its points) of one backbone's tables, in print order."""
    rows = [(UNEDITED, [1])] + [(editor, list(cfg.points)) for editor in cfg.editors]
    if backbone == cfg.backbones[0]:
        rows += [(ablation_key(a), [max(cfg.points)]) for a in cfg.ablations]
    return rows


def collect(cfg: TablesConfig) -> dict:
    """{backbone: {row: {"1"|"10"|...: entry}}} of every complete (all seeds) point."""
    summary: dict = {}
    for backbone in cfg.backbones:
        for row, points in rows_of(cfg, backbone):
            for point in points:
                paths = [cell_path(cfg.out_dir, backbone, row, point, seed) for seed in cfg.seeds]
                if all(os.path.isfile(p) for p in paths):
                    summary.setdefault(backbone, {}).setdefault(row, {})[str(point)] = _entry([read_json(p) for p in paths])
    return summary


def cells_finished(cfg: TablesConfig) -> tuple[int, int]:
    """(finished, all) table cells of the run: one per backbone, row, point and seed."""
    paths = [cell_path(cfg.out_dir, backbone, row, point, seed) for backbone in cfg.backbones
             for row, points in rows_of(cfg, backbone) for point in points for seed in cfg.seeds]
    return sum(os.path.isfile(p) for p in paths), len(paths)


def write_summary(cfg: TablesConfig, summary: dict) -> str:
    path = os.path.join(cfg.out_dir, "summary.json")
    write_json_atomic(path, summary)
    return path


# ---- figures ------------------------------------------------------------------------------------
def plot(summary: dict, backbone: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row: by_point for row, by_point in summary.get(backbone, {}).items()
            if row != UNEDITED and not row.startswith("liveedit-") and len(by_point) > 1}
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), sharex=True)
    for ax, key, label in zip(axes.flat, METRIC_KEYS + ("avg",), LABELS + ("Avg",)):
        for row, by_point in rows.items():
            xs = sorted(int(p) for p in by_point)
            ax.errorbar(xs, [by_point[str(x)][key] for x in xs], yerr=[by_point[str(x)]["std"][key] for x in xs],
                        marker="o", ms=3, capsize=2, label=NAMES.get(row, row),
                        lw=2.2 if row == "liveedit" else 1.0, color="black" if row == "liveedit" else None)
        ax.set_xscale("log")
        ax.set_title(label)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("sequential edits per chunk")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"toy world (v4), {backbone}: mean ± std over evaluation seeds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the Markdown -------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _row_cells(entry: dict) -> str:
    return " | ".join(_pct(entry[k]) for k in METRIC_KEYS) + f" | **{_pct(entry['avg'])}** ±{_pct(entry['std']['avg'])}"


def table1(cfg: TablesConfig, summary: dict, backbone: str) -> list[str]:
    lines = [f"### {backbone} (stands in for {paper.PAPER_BACKBONE.get(backbone, '-')})", "",
             "| #Edit | Editor | Rel | T-Gen | M-Gen | T-Loc | M-Loc | **Avg** ± std | records | edit s / edit | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    table = summary.get(backbone, {})
    if UNEDITED in table and "1" in table[UNEDITED]:
        e = table[UNEDITED]["1"]
        lines.append(f"| 0 | unedited | {_row_cells(e)} | {e['records']} | - | {e['peak_mb']:.0f} |")
    for point in cfg.points:
        for editor in cfg.editors:
            e = table.get(editor, {}).get(str(point))
            if e is None:
                lines.append(f"| {point} | {NAMES[editor]} | (not run) ||||||||| ")
                continue
            edit_s = "-" if e["edit_s"] is None else f"{e['edit_s']:.3f}"
            bold = "**" if editor == "liveedit" else ""
            lines.append(f"| {point} | {bold}{NAMES[editor]}{bold} | {_row_cells(e)} | {e['records']} | {edit_s} | "
                         f"{e['peak_mb']:.0f} |")
    return lines + [""]


def table2(cfg: TablesConfig, summary: dict) -> list[str]:
    backbone, point = cfg.backbones[0], str(max(cfg.points))
    table = summary.get(backbone, {})
    lines = [f"{backbone}, {point} edits per chunk; the paper's BLIP2-OPT-2.7B / E-VQA / 1,000 edits beside.", "",
             "| Setting | Rel | T-Gen | M-Gen | T-Loc | M-Loc | **Avg** ± std | paper Avg |", "|---|---|---|---|---|---|---|---|"]
    rows = [(UNEDITED, "1"), ("liveedit", point)] + [(ablation_key(a), point) for a in cfg.ablations]
    for row, at in rows:
        e = table.get(row, {}).get(at)
        ref = paper.TABLE2.get(row)
        ref_avg = f"{ref[5]:.2f}" if ref else "-"
        label = NAMES.get(row, row) + (" (0 edits)" if row == UNEDITED else "")
        lines.append(f"| {label} | {_row_cells(e)} | {ref_avg} |" if e else f"| {label} | (not run) |||||| {ref_avg} |")
    return lines + [""]


def _ranks(values: dict[str, float]) -> dict[str, int]:
    order = sorted(values, key=lambda k: -values[k])
    return {k: order.index(k) + 1 for k in values}


def comparison(cfg: TablesConfig, summary: dict, backbone: str) -> list[str]:
    """Row by row against the paper: Avg and its rank among the paper's editors, and pair orderings."""
    ref_name = paper.PAPER_BACKBONE.get(backbone)
    ref = paper.TABLE1_EVQA.get(ref_name, {})
    lines = []
    for point, ref_rows in ref.items():
        here = {e: summary.get(backbone, {}).get(e, {}).get(str(point)) for e in ref_rows}
        here = {e: v["avg"] for e, v in here.items() if v}
        if len(here) < 2:
            continue
        common = [e for e in ref_rows if e in here]
        ref_rank, our_rank = _ranks({e: ref_rows[e][5] for e in common}), _ranks({e: here[e] for e in common})
        pairs = [(a, b) for i, a in enumerate(common) for b in common[i + 1:]]
        agree = sum((ref_rows[a][5] - ref_rows[b][5]) * (here[a] - here[b]) > 0 for a, b in pairs)
        lines += [f"**{backbone} vs {ref_name}, {point} edit(s)**: {agree} of {len(pairs)} editor pairs are ordered "
                  f"as in the paper (by Avg).", "",
                  "| Editor | paper Avg | paper rank | here Avg | here rank |", "|---|---|---|---|---|"]
        lines += [f"| {NAMES[e]} | {ref_rows[e][5]:.2f} | {ref_rank[e]} | {100 * here[e]:.2f} | {our_rank[e]} |"
                  for e in sorted(common, key=lambda e: ref_rank[e])]
        lines.append("")
    return lines


def write_doc(cfg: TablesConfig, summary: dict, info: dict) -> str:
    """docs/TABLES.md (keeps the hand-written analysis between the analysis markers)."""
    old = open(cfg.doc_path).read() if os.path.isfile(cfg.doc_path) else ""
    analysis = old.split(ANALYSIS_START, 1)[1].split(ANALYSIS_END, 1)[0] if ANALYSIS_START in old else \
        "\n(Written by hand after a full run: why each ordering holds or not.)\n"
    figures = []
    for backbone in cfg.backbones:
        name = f"tables-{backbone}.png"
        plot(summary, backbone, os.path.join(os.path.dirname(cfg.doc_path), "figures", name))
        figures.append(f"![{backbone}](figures/{name})")
    lines = ["# The paper's tables on the toy world", "",
             "Generated by `python run_tables.py` (`make tables`) from `records/tables/summary.json`; the "
             "text between the analysis markers is written by hand. Numbers are teacher-forced token accuracy "
             "in percent (the paper's metric), mean over evaluation seeds, Avg ± sample std over seeds.", "",
             "## This run", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    done, total = cells_finished(cfg)
    lines.append(f"- cells finished: {done} of {total}" + ("" if done == total else
                 " (the run is not complete: a point is shown once all its seeds are finished)"))
    lines += ["", "## Table 1: every editor at 1 to 1,000 sequential edits", ""]
    for backbone in cfg.backbones:
        lines += table1(cfg, summary, backbone)
    if cfg.ablations:
        lines += ["## Table 2: LiveEdit's ablations", ""] + table2(cfg, summary)
    lines += ["## Figures", ""] + figures + [""]
    lines += ["## Against the paper's pattern", ""]
    for backbone in cfg.backbones:
        lines += comparison(cfg, summary, backbone)
    lines += [ANALYSIS_START + analysis + ANALYSIS_END, ""]
    write_text_atomic(cfg.doc_path, "\n".join(lines))
    return cfg.doc_path
