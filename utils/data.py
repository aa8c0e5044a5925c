"""Readers for the edit datasets: E-VQA, E-IC, VLKEB and VLKEB one-hop portability.

All readers share one JSON layout (a list of objects with the fields `src`, `rephrase`, `pred`,
`alt`, `image`, `image_rephrase`, `loc`, `loc_ans`, `m_loc`, `m_loc_q`, `m_loc_a`; the one-hop
file adds `port_new`) and produce `utils.records.EditRecord`s:

* request:        (image,          src + request suffix,    alt)
* text_rephrase:  (image,          rephrase + gen. suffix,  alt)
* image_rephrase: (image_rephrase, src + gen. suffix,       alt)
* text_loc:       (None,           loc + "?",               loc_ans)
* image_loc:      (m_loc,          m_loc_q + " The answer is:", m_loc_a)
* portability:    (image,          port_q,                  port_a), one per `port_new` item
  (VLKEB-ONEHOP only).

E-VQA appends " The answer is:" to the request and generality prompts; E-IC and VLKEB leave them
unchanged. Image fields are joined onto the image root; no image is opened here (see
`utils.images`). An image path must stay inside the image root: absolute paths and paths whose
`..` parts climb out of it are refused when the records are read. The check is on the path as
written, so a symlink inside the root is followed wherever it points (linking images in from
elsewhere is the user's choice). Every input check runs before any record is built, and each failure is one
`UserError` that says what is wrong and what to do.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from utils.errors import UserError
from utils.records import EditRecord, Sample

DATASET_NAMES = ("EVQA", "EIC", "VLKEB")
VLKEB_ONEHOP = "VLKEB-ONEHOP"
TOY = "TOY"  # the project's generated toy world (the toyworld package), E-VQA templates
ALL_DATASET_NAMES = DATASET_NAMES + (VLKEB_ONEHOP, TOY)
SPLITS = ("train", "eval")

PROMPT_FIELDS = ("src", "rephrase", "loc", "m_loc_q")
TARGET_FIELDS = ("alt", "loc_ans", "m_loc_a")
IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
REQUIRED_FIELDS = ("src", "rephrase", "alt", "image", "image_rephrase",
                   "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a")
OPTIONAL_FIELDS = ("pred",)
PORTABILITY_FIELD = "port_new"
PORTABILITY_ITEM_FIELDS = ("port_q", "port_a")
PORTABILITY_EDIT_FIELDS = ("port_edit_q", "port_edit_a")  # VLKEB's second edit; optional

_MAX_LISTED_PROBLEMS = 10
_MAX_LISTED_IMAGES = 5


@dataclass(frozen=True)
class PromptTemplates:
    """Suffixes appended to the raw prompts of one dataset."""

    request: str
    generality: str
    text_loc: str
    image_loc: str


_ANSWER_SUFFIX = " The answer is:"
TEMPLATES = {
    "EVQA": PromptTemplates(_ANSWER_SUFFIX, _ANSWER_SUFFIX, "?", _ANSWER_SUFFIX),
    "EIC": PromptTemplates("", "", "?", _ANSWER_SUFFIX),
    "VLKEB": PromptTemplates("", "", "?", _ANSWER_SUFFIX),
    VLKEB_ONEHOP: PromptTemplates("", "", "?", _ANSWER_SUFFIX),
    TOY: PromptTemplates(_ANSWER_SUFFIX, _ANSWER_SUFFIX, "?", _ANSWER_SUFFIX),
}

_DEFAULT_JSON = {
    ("EVQA", "train"): ("easy-edit-mm", "vqa", "vqa_train.json"),
    ("EVQA", "eval"): ("easy-edit-mm", "vqa", "vqa_eval.json"),
    ("EIC", "train"): ("easy-edit-mm", "caption", "caption_train_edit.json"),
    ("EIC", "eval"): ("easy-edit-mm", "caption", "caption_eval_edit.json"),
    ("VLKEB", "train"): ("VLKEB", "train.json"),
    ("VLKEB", "eval"): ("VLKEB", "eval.json"),
    (VLKEB_ONEHOP, "eval"): ("VLKEB", "eval_edit_onehop.json"),
    (TOY, "train"): ("toyworld", "train.json"),
    (TOY, "eval"): ("toyworld", "eval.json"),
}
_DEFAULT_IMAGE_ROOT = {
    "EVQA": ("easy-edit-mm", "images"),
    "EIC": ("easy-edit-mm", "images"),
    "VLKEB": ("VLKEB", "mmkb_images"),
    VLKEB_ONEHOP: ("VLKEB", "mmkb_images"),
    TOY: ("toyworld",),
}
_IMAGE_SOURCES = {
    "EVQA": "the COCO val2014 images and MMEdit's val2014_image_rephrase images",
    "EIC": "the COCO val2014 images and MMEdit's val2014_image_rephrase images",
    "VLKEB": "VLKEB's mmkb_images",
    VLKEB_ONEHOP: "VLKEB's mmkb_images",
    TOY: "the toy world (python -m toyworld --out data/toyworld)",
}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def canonical_dataset_name(name: str) -> str:
    """Return the canonical spelling of a dataset name (case-insensitive; '_' may stand for '-')."""
    if isinstance(name, str):
        key = name.strip().upper().replace("_", "-")
        if key in ALL_DATASET_NAMES:
            return key
    raise UserError(
        f"Unknown dataset name {name!r}. Use one of: {', '.join(ALL_DATASET_NAMES)} "
        f"(case does not matter)."
    )


def default_data_paths(name: str, split: str, data_dir: str | os.PathLike = "data") -> tuple[str, str]:
    """Return `(json_path, image_root)` for a dataset split in the paper repository's layout.

    `split` is "train" or "eval". VLKEB-ONEHOP only has an "eval" split.
    """
    name = canonical_dataset_name(name)
    split = _canonical_split(split)
    parts = _DEFAULT_JSON.get((name, split))
    if parts is None:
        available = [s for (n, s) in _DEFAULT_JSON if n == name]
        raise UserError(
            f"Dataset {name} has no {split!r} split; use split {' or '.join(map(repr, available))}."
        )
    data_dir = os.fspath(data_dir)
    return os.path.join(data_dir, *parts), os.path.join(data_dir, *_DEFAULT_IMAGE_ROOT[name])


def load_edit_dataset(
    name: str,
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    limit: int | None = None,
    check_images: bool = True,
) -> list[EditRecord]:
    """Read an edit dataset file into `EditRecord`s, validating everything first.

    `limit` keeps (and validates) only the first `limit` records. With `check_images`, every
    referenced image path must exist under `image_root` (existence only, nothing is decoded);
    without it, nothing but the JSON file is touched. Raises `UserError` on any bad input.
    """
    name = canonical_dataset_name(name)
    _check_limit(limit)
    json_path, image_root = os.fspath(json_path), os.fspath(image_root)
    with_portability = name == VLKEB_ONEHOP
    raw_records = _read_json_list(json_path)[:limit]
    _validate_records(raw_records, json_path, with_portability)
    if check_images:
        _check_images_exist(raw_records, json_path, image_root, name)
    templates = TEMPLATES[name]
    return [
        _build_record(raw, index, image_root, templates, with_portability)
        for index, raw in enumerate(raw_records)
    ]


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------

def _canonical_split(split: str) -> str:
    """Return "train" or "eval", or raise a `UserError` naming the valid splits."""
    key = split.strip().lower() if isinstance(split, str) else None
    if key not in SPLITS:
        raise UserError(f"Unknown split {split!r}. Use one of: {', '.join(SPLITS)}.")
    return key


def _check_limit(limit: int | None) -> None:
    """Accept None (all records) or a positive integer."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UserError(
            f"limit must be a positive number of records, or None for all records; got {limit!r}."
        )


# ---------------------------------------------------------------------------------------------
# JSON reading and validation
# ---------------------------------------------------------------------------------------------

def _read_json_list(json_path: str) -> list[Any]:
    """Parse `json_path` and return its top-level list, or raise a `UserError` saying why not."""
    if not os.path.exists(json_path):
        raise UserError(
            f"Dataset file not found: {json_path}. Check the path, or download the annotation "
            f"files into the data folder (see default_data_paths for the expected layout)."
        )
    if not os.path.isfile(json_path):
        raise UserError(f"Dataset path {json_path} is not a file; pass the path of the JSON file.")
    try:
        with open(json_path, encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"Dataset file {json_path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}. Fix the file or download it again."
        ) from exc
    except UnicodeDecodeError as exc:
        raise UserError(
            f"Dataset file {json_path} is not UTF-8 text ({exc}). Download it again."
        ) from exc
    except OSError as exc:
        raise UserError(f"Cannot read dataset file {json_path}: {exc}.") from exc
    if not isinstance(data, list):
        raise UserError(
            f"Dataset file {json_path} must hold a JSON list of edit records at the top level, "
            f"but it holds a JSON {_json_type(data)}. Use an E-VQA, E-IC or VLKEB annotation file."
        )
    if not data:
        raise UserError(f"Dataset file {json_path} holds an empty list: there is nothing to edit.")
    return data


def _validate_records(raw_records: list[Any], json_path: str, with_portability: bool) -> None:
    """Check every record; raise one `UserError` that lists the problems found, if any."""
    problems = []
    for index, raw in enumerate(raw_records):
        problems.extend(_record_problems(raw, index, with_portability))
    if not problems:
        return
    shown = problems[:_MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    lines = "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
    raise UserError(
        f"Dataset file {json_path} has {len(problems)} problem(s):\n  {lines}\n"
        f"Fix or remove these records (or use a smaller limit to read only the records before them)."
    )


def _record_problems(raw: Any, index: int, with_portability: bool) -> list[str]:
    """Return one message per problem in the record at position `index` (empty when valid)."""
    if not isinstance(raw, dict):
        return [f"record {index}: is a JSON {_json_type(raw)}, but every record must be an object"]
    problems = []
    for field in REQUIRED_FIELDS:
        problem = _text_field_problem(raw, field, _field_role(field))
        if problem:
            problems.append(f"record {index}, field '{field}': {problem}")
    for field in IMAGE_FIELDS:
        problem = _image_path_problem(raw.get(field))
        if problem:
            problems.append(f"record {index}, field '{field}': {problem}")
    pred = raw.get("pred")
    if pred is not None and not isinstance(pred, str):
        problems.append(
            f"record {index}, field 'pred': must be a string (or absent), got a JSON {_json_type(pred)}"
        )
    if with_portability:
        problems.extend(f"record {index}, {p}" for p in _portability_problems(raw))
    return problems


def _text_field_problem(container: dict, field: str, role: str) -> str | None:
    """Describe what is wrong with a required non-empty string field, or return None."""
    if field not in container:
        return f"is missing; it holds the {role}"
    value = container[field]
    if not isinstance(value, str):
        return f"must be a string (the {role}), got a JSON {_json_type(value)}"
    if not value.strip():
        return f"is empty; it must hold the {role}"
    return None


def _image_path_problem(value: Any) -> str | None:
    """Why an image path (already known to be a non-empty string, or not checked here) is refused.

    Lexical check: absolute paths and paths that climb out of the image root with `..` are
    refused; symlinks under the root are not resolved (see the module docstring).
    """
    if not isinstance(value, str) or not value.strip():
        return None  # reported by the required-field check
    if "\0" in value:
        return f"path {value!r} contains a NUL character"
    if os.path.isabs(value) or os.path.splitdrive(value)[0]:
        return (f"path {value!r} is absolute; image paths must be relative to the image root "
                f"(absolute paths could read any file on this machine)")
    normal = os.path.normpath(value)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return (f"path {value!r} leaves the image root through '..'; image paths must stay inside the "
                f"image root (put the image there, or link it there with a symlink)")
    return None


def _portability_problems(raw: dict) -> list[str]:
    """Check the `port_new` list of a VLKEB one-hop record."""
    items = raw.get(PORTABILITY_FIELD)
    if PORTABILITY_FIELD not in raw:
        return [f"field '{PORTABILITY_FIELD}': is missing; VLKEB-ONEHOP records need a list of "
                f"one-hop questions (use dataset VLKEB for files without them)"]
    if not isinstance(items, list) or not items:
        got = "an empty list" if items == [] else f"a JSON {_json_type(items)}"
        return [f"field '{PORTABILITY_FIELD}': must be a non-empty list of objects with "
                f"'port_q' and 'port_a', got {got}"]
    problems = []
    for position, item in enumerate(items):
        name = f"{PORTABILITY_FIELD}[{position}]"
        if not isinstance(item, dict):
            problems.append(f"field '{name}': must be an object, got a JSON {_json_type(item)}")
            continue
        present = [f for f in PORTABILITY_EDIT_FIELDS if f in item]
        for field in PORTABILITY_ITEM_FIELDS + (PORTABILITY_EDIT_FIELDS if present else ()):
            problem = _text_field_problem(item, field, _field_role(field))
            if problem:
                problems.append(f"field '{name}.{field}': {problem}")
    return problems


def _field_role(field: str) -> str:
    """A short description of what a field is for, used in error messages."""
    if field in TARGET_FIELDS or field in ("port_a", "port_edit_a"):
        return "target answer"
    if field in IMAGE_FIELDS:
        return "image path relative to the image root"
    return "prompt text"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def _referenced_images(raw_records: list[dict], image_root: str) -> list[str]:
    """All image paths the records refer to, joined onto `image_root`, unique and in order."""
    paths = (_join_image(image_root, raw[field]) for raw in raw_records for field in IMAGE_FIELDS)
    return list(dict.fromkeys(paths))


def _check_images_exist(raw_records: list[dict], json_path: str, image_root: str, name: str) -> None:
    """Raise one `UserError` if any referenced image file does not exist (nothing is decoded)."""
    paths = _referenced_images(raw_records, image_root)
    missing = [path for path in paths if not os.path.isfile(path)]
    if not missing:
        return
    root_note = "" if os.path.isdir(image_root) else f" The image root {image_root} does not exist."
    listed = "\n  ".join(missing[:_MAX_LISTED_IMAGES])
    raise UserError(
        f"{len(missing)} of {len(paths)} images referenced by {json_path} are missing under the "
        f"image root {image_root}.{root_note} First missing:\n  {listed}\n"
        f"Download {_IMAGE_SOURCES[name]} and place them under {image_root} so that the relative "
        f"paths in the JSON resolve there, pass the right image root, or skip this check with "
        f"check_images=False."
    )


def _join_image(image_root: str, relative: str) -> str:
    """Join a dataset image path onto the image root."""
    return os.path.join(image_root, relative)


# ---------------------------------------------------------------------------------------------
# Record building
# ---------------------------------------------------------------------------------------------

def _build_record(
    raw: dict, index: int, image_root: str, templates: PromptTemplates, with_portability: bool
) -> EditRecord:
    """Map one validated JSON record to an `EditRecord` (spec section 8.2 and 8.3)."""
    image = _join_image(image_root, raw["image"])
    target = raw["alt"]
    return EditRecord(
        requests=[Sample(raw["src"] + templates.request, target, image)],
        generality={
            "text_rephrase": [Sample(raw["rephrase"] + templates.generality, target, image)],
            "image_rephrase": [Sample(raw["src"] + templates.generality, target,
                                      _join_image(image_root, raw["image_rephrase"]))],
        },
        locality={
            "text_loc": [Sample(raw["loc"] + templates.text_loc, raw["loc_ans"], None)],
            "image_loc": [Sample(raw["m_loc_q"] + templates.image_loc, raw["m_loc_a"],
                                 _join_image(image_root, raw["m_loc"]))],
        },
        portability=_portability_samples(raw, image) if with_portability else [],
        portability_edits=_portability_edits(raw) if with_portability else [],
        original_answer=raw.get("pred"),
        index=index,
    )


def _portability_samples(raw: dict, image: str) -> list[Sample]:
    """One (request image, port_q, port_a) sample per `port_new` item."""
    return [Sample(item["port_q"], item["port_a"], image) for item in raw[PORTABILITY_FIELD]]


def _portability_edits(raw: dict) -> list[Sample]:
    """VLKEB's second edit per `port_new` item: text-only (port_edit_q, port_edit_a); [] if the file has none."""
    items = raw[PORTABILITY_FIELD]
    if not all(all(f in item for f in PORTABILITY_EDIT_FIELDS) for item in items):
        return []
    return [Sample(item["port_edit_q"], item["port_edit_a"], None) for item in items]
