"""Records of a data split for a run: the one loader that training, evaluation and the demo call."""
from __future__ import annotations

from toyworld import ensure_toy_data
from utils.data import TOY, canonical_dataset_name, default_data_paths, load_edit_dataset
from utils.errors import UserError
from utils.records import EditRecord


def load_split(data_name: str, split: str, data_dir: str, limit: int | None = None) -> tuple[str, list[EditRecord]]:
    """(canonical data set name, its `split` records, the first `limit` of them).

    For TOY the default toy world is generated first when `data_dir/toyworld` holds none.
    """
    name = canonical_dataset_name(data_name)
    if name == TOY:
        ensure_toy_data(data_dir)
    records = load_edit_dataset(name, *default_data_paths(name, split, data_dir), limit=limit)
    if not records:
        raise UserError(f"the {name} {split} data under {data_dir} has no records")
    return name, records
