"""The paper's Table-2 ablations of LiveEdit as config overrides: one place maps each row's name to
the keys it changes (docs/ABLATIONS.md says what each row means and the paper's numbers).

    ablation_config("l_sr1")   -> {"train_cfg": {"soft_routing_abs_lambda": 0.0}}
    ablated_config(config, "HR*") -> the LiveEditConfig with those keys replaced

Names are the paper's row names, any case, with or without the leading "-" ("-l_sr1", "SR", "HR*",
also "hr" without the star, which is awkward in folder names).
"""
from __future__ import annotations

import copy

from utils.errors import UserError

# paper row name -> (overrides of the LiveEdit YAML keys, what the row changes)
ABLATIONS: dict[str, tuple[dict, str]] = {
    "l_sr1": ({"train_cfg": {"soft_routing_abs_lambda": 0.0}},
              "no absolute soft-routing loss (l_sr1)"),
    "l_sr2": ({"train_cfg": {"soft_routing_rel_lambda": 0.0}},
              "no relative soft-routing loss (l_sr2)"),
    # mean mixing never reads the query features, and the two soft-routing losses train only them:
    # computing the losses would change nothing but the logged total, so the row skips them
    "SR": ({"expert_mixing": "mean",
            "train_cfg": {"soft_routing_abs_lambda": 0.0, "soft_routing_rel_lambda": 0.0}},
           "the hard-selected experts averaged (1/k each) instead of soft-weighted"),
    "HR*": ({"visual_key": "pooled"},
            "hard routing on the whole image, mean-pooled and projected, instead of prompt-led extraction"),
}


def ablation_names() -> list[str]:
    """The paper's Table-2 rows, in its order."""
    return list(ABLATIONS)


def _key(name: str) -> str:
    wanted = str(name).strip().lstrip("-").rstrip("*").lower()
    for row in ABLATIONS:
        if row.rstrip("*").lower() == wanted:
            return row
    raise UserError(f"unknown LiveEdit ablation {name!r}; the paper's Table-2 rows are "
                    f"{', '.join(ABLATIONS)}")


def ablation_config(name: str) -> dict:
    """Overrides (nested like the YAML) that turn LiveEdit into Table-2 row `name`; a fresh copy."""
    return copy.deepcopy(ABLATIONS[_key(name)][0])


def ablation_description(name: str) -> str:
    """One line: what row `name` changes."""
    return ABLATIONS[_key(name)][1]


def merge_overrides(base: dict, overrides: dict) -> dict:
    """`base` (a config as a dict) with `overrides` applied, nested sections merged key by key; a copy."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def ablated_config(config, name: str):
    """LiveEditConfig `config` turned into Table-2 row `name` (a new config; `config` is unchanged)."""
    from utils.config import config_to_dict, from_dict

    return from_dict(type(config), merge_overrides(config_to_dict(config), ablation_config(name)),
                     where=f"LiveEdit ablation {name}")
