"""Result numbers of an evaluation: means over items, rounding, the metric table, TensorBoard, the plot.

The five metrics of the paper's tables, by their place in `mean_results.json`:
    Rel   reliability            T-Gen  generality/text_rephrase   M-Gen  generality/image_rephrase
    T-Loc locality/text_loc      M-Loc  locality/image_loc         (Port  portability, VLKEB one-hop)
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from utils.io import write_atomic

ROUND_DIGITS = 4
GROUP_ORDER = ("generality", "locality", "portability", "reliability")  # key order of a record result
# (table label, short key, path in a mean) of every metric, in the paper's column order
METRICS = (("Rel", "rel", ("reliability",)), ("T-Gen", "t_gen", ("generality", "text_rephrase")),
           ("M-Gen", "m_gen", ("generality", "image_rephrase")), ("T-Loc", "t_loc", ("locality", "text_loc")),
           ("M-Loc", "m_loc", ("locality", "image_loc")), ("Port", "port", ("portability",)))


def metric_values(mean: dict, path: Sequence[str]) -> dict:
    """The {acc, exact_match, ...} entry of one metric in a mean ({} when the data has none)."""
    for key in path:
        mean = mean.get(key, {}) if isinstance(mean, dict) else {}
    return mean


def format_table(total_mean: dict) -> str:
    """A small table of the mean accuracy / exact match per metric."""
    lines = [f"{'metric':<8}{'acc':>9}{'exact':>9}"]
    for label, _, path in METRICS:
        values = metric_values(total_mean, path)
        if "acc" not in values:
            continue
        em = values.get("exact_match")
        lines.append(f"{label:<8}{values['acc']:>9.4f}{em:>9.4f}" if em is not None else
                     f"{label:<8}{values['acc']:>9.4f}{'-':>9}")
    return "\n".join(lines)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mean_items(items: list[dict]) -> dict:
    keys = [k for k in dict.fromkeys(k for it in items for k in it) if any(_is_number(it.get(k)) for it in items)]
    return {k: float(np.mean([it[k] for it in items if _is_number(it.get(k))])) for k in keys}


def mean_results(results: Sequence[dict]) -> dict:
    """Mean of every numeric field over all items of all records (spec §9.4 `get_mean_results`)."""
    out: dict[str, Any] = {}
    for group in GROUP_ORDER:
        values = [r[group] for r in results if group in r]
        if not values:
            continue
        if isinstance(values[0], list):
            items = [it for v in values for it in v]
            if items:
                out[group] = _mean_items(items)
        else:
            kinds = dict.fromkeys(k for v in values for k in v)
            per_kind = {k: [it for v in values for it in v.get(k, [])] for k in kinds}
            out[group] = {k: _mean_items(its) for k, its in per_kind.items() if its}
    return out


def round_floats(obj, digits: int = ROUND_DIGITS):
    """A copy of `obj` with every float rounded (the paper's files keep 4 decimals)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def flatten_metrics(mean: dict, prefix: str = "") -> dict[str, float]:
    """{"reliability": {"acc": a}} -> {"reliability/acc": a} (numbers only)."""
    flat = {}
    for key, value in mean.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name + "/"))
        elif _is_number(value):
            flat[name] = float(value)
    return flat


class ScalarLog:
    """TensorBoard scalars under `<folder>/tb` (a no-op when disabled)."""

    def __init__(self, folder: str, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=os.path.join(folder, "tb"))

    def log(self, mean: dict, step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in flatten_metrics(mean, prefix).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_metrics(path: str, xs: Sequence[int], means: Sequence[dict], xlabel: str, log_x: bool) -> None:
    """One line per accuracy / exact-match metric against `xs` (PNG, Agg canvas, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    flat = [flatten_metrics(m) for m in means]
    names = [n for n in dict.fromkeys(k for f in flat for k in f) if n.endswith(("/acc", "/exact_match"))]
    fig = Figure(figsize=(10, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name in names:
        ys = [f.get(name, np.nan) for f in flat]
        style = "--" if name.endswith("exact_match") else "-"
        ax.plot(xs, ys, style, marker="o", markersize=3, label=name)
    if log_x:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
