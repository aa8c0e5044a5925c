"""From the finished cells of `run_lifelong.py` to `summary.json`, a figure and the run's results section
of docs/LIFELONG.md (between markers named after the run's folder; the rest is written by hand).

An entry is the mean over training seeds with the sample standard deviation (`runs.tables.report._entry`),
plus the routing diagnostics averaged over the seeds. The lifelong curve is averaged point by point.
"""
from __future__ import annotations

import os
import statistics

from utils.io import read_json, write_json_atomic, write_text_atomic

from runs.lifelong.plan import UNEDITED_EVALUATION, LifelongConfig, eval_cell
from runs.tables.report import LABELS, METRIC_KEYS, _entry, metrics_mean_std


def markers(cfg: LifelongConfig) -> tuple[str, str]:
    """The results section's markers, named after the run's folder: two runs (say, tiny-blip2 with three
    seeds and the other backbones with one) keep one section each in the same doc."""
    name = os.path.basename(os.path.normpath(cfg.out_dir))
    return f"<!-- {name}-results:start -->", f"<!-- {name}-results:end -->"


# (column label, routing group, field) of the diagnostics printed beside the metrics
ROUTING = (("selected / query (Rel)", "rel", "selected_mean"), ("p95", "rel", "selected_p95"),
           ("own weight (Rel)", "rel", "own_weight"), ("own selected (M-Gen)", "m_gen", "own_selected"),
           ("own weight (M-Gen)", "m_gen", "own_weight"), ("M-Loc routed", "m_loc", "routed"))


def _routing_mean(routings: list[dict | None]) -> dict:
    out: dict = {}
    for _, group, key in ROUTING:
        values = [r[group][key] for r in routings if r and key in r.get(group, {})]
        if values:
            out.setdefault(group, {})[key] = round(statistics.fmean(values), 4)
    return out


def _curve(cells: list[dict]) -> list[dict]:
    """Mean ± std per lifelong checkpoint (the checkpoints every seed has)."""
    by_edits = [{p["edits"]: p for p in c["curve"]} for c in cells]
    common = sorted(set.intersection(*(set(b) for b in by_edits)))
    points = []
    for n in common:
        entry = metrics_mean_std([b[n] for b in by_edits])
        points.append({"edits": n, **{k: entry[k] for k in METRIC_KEYS}, "std": entry["std"],
                       "routing": _routing_mean([b[n].get("routing") for b in by_edits])})
    return points


def collect(cfg: LifelongConfig) -> dict:
    """{backbone: {"unedited": entry, evaluation name: entry (+ "curve" for lifelong)}}. An entry is over the
    requested seeds whose cell is finished (its "seeds"): a backbone run with fewer seeds than another in the
    same folder keeps its rows, marked with the seeds they hold."""
    summary: dict = {}
    for backbone in cfg.backbones:
        table: dict = {}
        unedited = eval_cell(cfg, backbone, cfg.capped(UNEDITED_EVALUATION), None)
        if os.path.isfile(unedited):
            table["unedited"] = _entry([read_json(unedited)])
        for evaluation in cfg.evaluations():
            finished = {seed: path for seed in cfg.seeds
                        if os.path.isfile(path := eval_cell(cfg, backbone, evaluation, seed))}
            if not finished:
                continue
            cells = [read_json(path) | {"seed": seed} for seed, path in finished.items()]
            entry = _entry(cells) | {"edits": evaluation.edits, "routing": _routing_mean([c.get("routing") for c in cells])}
            if evaluation.lifelong:
                entry["curve"] = _curve(cells)
            table[evaluation.name] = entry
        if table:
            summary[backbone] = table
    return summary


def write_summary(cfg: LifelongConfig, summary: dict) -> str:
    path = os.path.join(cfg.out_dir, "summary.json")
    write_json_atomic(path, summary)
    return path


def plot(curve: list[dict], backbone: str, path: str) -> None:
    """The lifelong curve: the five metrics and the experts selected per query against edits so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["edits"] for p in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in zip(METRIC_KEYS, LABELS):
        left.errorbar(xs, [p[key] for p in curve], yerr=[p["std"][key] for p in curve], marker="o", ms=3,
                      capsize=2, label=label)
    left.set(xscale="log", ylim=(-0.03, 1.03), xlabel="edits so far (one repository)", title="metrics")
    left.legend(fontsize=8)
    right.plot(xs, [p["routing"].get("rel", {}).get("selected_mean") for p in curve], marker="o", color="C0")
    right.set(xscale="log", xlabel="edits so far", title="routing (Rel queries and M-Gen queries)")
    right.set_ylabel("experts selected per Rel query", color="C0")
    weight = right.twinx()
    weight.plot(xs, [p["routing"].get("m_gen", {}).get("own_weight") for p in curve], marker="s", color="C1")
    weight.set_ylim(-0.03, 1.03)
    weight.set_ylabel("soft weight on the own expert, M-Gen queries", color="C1")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"LiveEdit, {backbone}, toy world v4: --lifelong, mean ± std over training seeds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _row(label: str, entry: dict, n_seeds: int) -> str:
    metrics = " | ".join(f"{entry[k]:.3f} ± {entry['std'][k]:.3f}" if n_seeds > 1 else f"{entry[k]:.3f}"
                         for k in METRIC_KEYS)
    routing = " | ".join(_num(entry.get("routing", {}).get(g, {}).get(k)) for _, g, k in ROUTING)
    return f"| {label} | {metrics} | {routing} |"


def results_section(cfg: LifelongConfig, summary: dict, info: dict) -> list[str]:
    head = ("| evaluation | " + " | ".join(LABELS) + " | " + " | ".join(label for label, _, _ in ROUTING) + " |")
    lines = [f"Generated by `python run_lifelong.py` from `{os.path.join(cfg.out_dir, 'summary.json')}`: mean ± sample "
             f"std over the training seeds, each evaluated over the eval split in the file's order.", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()] + [""]
    for backbone, table in summary.items():
        seeds = sorted({tuple(e["seeds"]) for name, e in table.items() if name != "unedited"})
        held = "; ".join(", ".join(map(str, s)) for s in seeds)
        lines += [f"### {backbone}", ""] + ([f"Training seeds in these rows: {held}.", ""] if held else []) + \
            [head, "|" + "---|" * (1 + len(LABELS) + len(ROUTING))]
        if "unedited" in table:
            lines.append(_row(f"unedited, -sen {cfg.capped(UNEDITED_EVALUATION).edits}", table["unedited"], 1))
        for evaluation in cfg.evaluations():
            entry = table.get(evaluation.name)
            if entry is None:
                continue
            if evaluation.lifelong and entry.get("curve"):
                for point in entry["curve"]:
                    lines.append(_row(f"--lifelong -sen {evaluation.edits} over {evaluation.records}, after "
                                      f"{point['edits']}", point, len(entry["seeds"])))
                name = f"lifelong-{backbone}.png"
                plot(entry["curve"], backbone, os.path.join(os.path.dirname(cfg.doc_path), "figures", name))
                continue
            label = f"look-alike split, -sen {evaluation.edits} (no target)" if evaluation.lookalike else \
                f"-sen {evaluation.edits}"
            lines.append(_row(f"{label}, {evaluation.records} records", entry, len(entry["seeds"])))
        lines += ["", f"![{backbone} lifelong curve](figures/lifelong-{backbone}.png)"] if any(
            e.lifelong and e.name in table for e in cfg.evaluations()) else []
        lines.append("")
    return lines


def write_doc(cfg: LifelongConfig, summary: dict, info: dict) -> str:
    """Replace the results section of `cfg.doc_path` (a new file holds only that section)."""
    start, end = markers(cfg)
    old = open(cfg.doc_path).read() if os.path.isfile(cfg.doc_path) else ""
    before, after = (old.split(start, 1)[0], old.split(end, 1)[1]) if start in old and end in old else \
        (old + ("\n" if old else "") + f"## Results of `run_lifelong.py --out_dir {cfg.out_dir}`\n\n", "\n")
    body = "\n".join(results_section(cfg, summary, info))
    write_text_atomic(cfg.doc_path, f"{before}{start}\n{body}\n{end}{after}")
    return cfg.doc_path
