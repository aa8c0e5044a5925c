"""Routing diagnostics of an evaluation: why a metric of a routing editor (LiveEdit) falls.

For the samples of the scored records, with the chunk's (or the lifelong stream's) edits in place:
    rel, m_gen   own_selected   share of queries whose own edit's expert passes hard routing
                 selected_mean, selected_p95   experts selected per query
                 own_weight     soft weight on the own expert (0 when not selected)
    m_loc        routed         share of image-locality probes routed to any expert (should be ~0)
                 selected_mean, selected_p95
Text-only samples are never routed by LiveEdit and are not counted. Written as "routing" beside
"total_mean" in mean_results.json, per chunk in split files, at each lifelong checkpoint, and to
TensorBoard under routing/.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from utils.records import EditRecord, Sample

KINDS = {"rel": ("reliability", None), "m_gen": ("generality", "image_rephrase"), "m_loc": ("locality", "image_loc")}


def expert_index(records: Sequence[EditRecord], positions: Sequence[int], units: Sequence[str], start: int = 0
                 ) -> dict[int, int]:
    """Record position -> repository index of its first request's expert, given the edit units' keys
    in edit order (one expert per unit, numbered from `start`)."""
    index = {}
    for i, key in enumerate(units):
        pos, group, _, j = key.split("/")
        if group == "reliability" and j == "0":
            index[int(pos)] = start + i
    return {p: index[p] for p in positions if p in index}


def _samples(records: Sequence[EditRecord], positions: Sequence[int], kind: str) -> list[tuple[int, Sample]]:
    group, sub = KINDS[kind]
    out = []
    for pos in positions:
        record = records[pos]
        items = record.requests if group == "reliability" else getattr(record, group).get(sub, [])
        out += [(pos, s) for s in items if s.image is not None]
    return out


def routing_report(editor, records: Sequence[EditRecord], positions: Sequence[int], own: dict[int, int],
                   batch_size: int) -> dict | None:
    """The diagnostics above, or None for an editor that does not route (`editor.routing_of` is None)."""
    report = {}
    for kind in KINDS:
        pairs = _samples(records, positions, kind)
        if not pairs:
            continue
        rows = editor.routing_of([s for _, s in pairs], [own.get(p) for p, _ in pairs], batch_size)
        if rows is None:
            return None
        selected = np.array([r["selected"] for r in rows], dtype=float)
        entry = {"n": len(rows), "selected_mean": float(selected.mean()),
                 "selected_p95": float(np.percentile(selected, 95))}
        if kind == "m_loc":
            entry["routed"] = float((selected > 0).mean())
        else:
            entry["own_selected"] = float(np.mean([r["own_selected"] for r in rows]))
            entry["own_weight"] = float(np.mean([r["own_weight"] for r in rows]))
        report[kind] = entry
    return report or None


def mean_report(reports: Sequence[dict | None]) -> dict | None:
    """Sample-weighted mean of chunk reports (percentiles: the mean of the chunks' p95)."""
    reports = [r for r in reports if r]
    if not reports:
        return None
    out = {}
    for kind in KINDS:
        parts = [r[kind] for r in reports if kind in r]
        if not parts:
            continue
        n = sum(p["n"] for p in parts)
        out[kind] = {"n": n} | {key: float(sum(p[key] * p["n"] for p in parts) / n)
                                for key in parts[0] if key != "n"}
    return out
