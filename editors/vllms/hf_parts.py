"""Tokenizer and image-processor files of a model folder: checked before the weights, then loaded.

Without these checks a folder lacking tokenizer files loads an EMPTY tokenizer (and fails later
with a bare StopIteration), and a sentencepiece-only folder (FastChat's Vicuna: `tokenizer.model`,
no `tokenizer.json`) fails with a tiktoken traceback after every weight has been read.
"""
from __future__ import annotations

import importlib.util
import os

from transformers import AutoImageProcessor, AutoTokenizer

from utils.errors import UserError

# The packages transformers needs to convert a sentencepiece `tokenizer.model` (pinned in requirements.txt).
SENTENCEPIECE_PACKAGES = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}
PROCESSOR_FILE = "preprocessor_config.json"


def check_tokenizer_files(folder: str) -> None:
    """A tokenizer transformers can read offline: `tokenizer.json`, `tokenizer.model` or `vocab.json` + `merges.txt`."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if has("tokenizer.json") or (has("vocab.json") and has("merges.txt")):
        return
    if has("tokenizer.model"):
        absent = [pkg for pkg, module in SENTENCEPIECE_PACKAGES.items() if not _importable(module)]
        if absent:
            raise UserError(f"{folder}/tokenizer.model is a sentencepiece tokenizer and needs the package(s) "
                            f"{', '.join(absent)}: run `pip install -r requirements.txt` (it pins them)")
        return
    raise UserError(f"no tokenizer files in {folder}: expected tokenizer.json, tokenizer.model or vocab.json + "
                    f"merges.txt; copy them from the original model folder")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is absent
        return False


def check_processor_file(folder: str) -> None:
    if not os.path.isfile(os.path.join(folder, PROCESSOR_FILE)):
        raise UserError(f"no {PROCESSOR_FILE} in {folder}: the image preprocessing settings are missing; copy the "
                        f"file from the original model folder")


def load_tokenizer(folder: str):
    """`AutoTokenizer.from_pretrained(folder)`, refusing an empty or unreadable tokenizer."""
    check_tokenizer_files(folder)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot read the tokenizer in {folder}: {str(exc).splitlines()[0]}") from exc
    if len(tok) == 0 or not tok("a", add_special_tokens=False)["input_ids"]:
        raise UserError(f"the tokenizer in {folder} is empty; copy its tokenizer files again")
    return tok


def load_image_processor(folder: str):
    check_processor_file(folder)
    try:
        return AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {folder}/{PROCESSOR_FILE}: {str(exc).splitlines()[0]}") from exc
